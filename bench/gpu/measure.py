"""One measured run, in this process: a `builder` command, or llm-compressor's oneshot; a JSON record.

    python bench/gpu/measure.py RESULT.json builder build RELEASE [OVERRIDES...] --out DIR --force
    python bench/gpu/measure.py RESULT.json llmc RECIPE SOURCE_DIR IDS.safetensors OUT_DIR GROUP_SIZE

The record: exit code, whole wall time, the seconds of the layer-by-layer work (the builder's
calibration, GPTQ included: builder.quant.calibrate.for_build; llm-compressor's oneshot call), peak
GPU memory as torch.cuda.max_memory_allocated reports it (None when CUDA never started), peak RSS of
this process, the distributions whose modules it imported, and (builder) the artifact's content digest.
In its own process, so that each figure is one run's: the kit's driver never imports torch.
"""

import json
import resource
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_distributions() -> list:
    """The installed distributions that provided a module now in sys.modules, normalised names."""
    found = metadata.packages_distributions()
    names = {d for module in list(sys.modules) for d in found.get(module.split(".")[0], [])}
    return sorted({name.lower().replace("_", "-").replace(".", "-") for name in names})


def peak_gpu_bytes():
    """torch.cuda.max_memory_allocated() of this process, or None when CUDA was not used."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def timed(module, name: str, record: dict):
    """Wrap module.name so that its calls' wall time adds up in record["work_seconds"]."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record["work_seconds"] = record.get("work_seconds", 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def run_builder(argv: list, record: dict) -> int:
    """builder's CLI, in process, with its calibration timed (when the builder has that function)."""
    sys.path.insert(0, str(ROOT))
    from builder import determinism

    determinism.apply_environment()  # what builder.cli.main does first, before torch loads
    try:
        from builder.quant import calibrate

        timed(calibrate, "for_build", record)
    except (ImportError, AttributeError) as error:  # a restructured builder: whole-run time only
        record["work_note"] = f"calibration not timed apart: {error}"
    from builder.cli import main

    code = main(argv)
    if code == 0 and "--out" in argv:
        manifest = json.loads((Path(argv[argv.index("--out") + 1]) / "manifest.json").read_text())
        record["content_digest"] = manifest["content_digest"]
        record["toolchain"] = manifest["inputs"]["toolchain"]  # packages read by version, maybe never imported
    return code


def run_llmc(recipe: str, source: str, ids_file: str, out: str, group_size: str, record: dict) -> int:
    """llm-compressor's oneshot of recipe (bench/llmcompressor_side.py's modifiers) on the given token
    windows, in their order, then its compressed save; the oneshot call timed apart."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.canonical import file_entries, tree_digest
    from llmcompressor_side import modifier

    torch.manual_seed(0)
    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=modifier(recipe, int(group_size)), max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
    record["work_seconds"] = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    weights = [entry for entry in file_entries(Path(out)) if entry["path"].endswith(".safetensors")]
    record["content_digest"] = tree_digest(weights)  # its weights: llm-compressor writes no manifest
    return 0


def main(argv: list) -> int:
    result, tool, rest = Path(argv[0]), argv[1], argv[2:]
    record = {"tool": tool, "argv": rest}
    start = time.perf_counter()
    try:
        code = run_builder(rest, record) if tool == "builder" else run_llmc(*rest, record=record)
    except Exception as error:  # recorded, so that the kit's table says what failed and goes on
        traceback.print_exc()
        record["error"] = f"{type(error).__name__}: {error}"[:300]
        code = 1
    record.update(code=code, seconds=round(time.perf_counter() - start, 3), peak_gpu_bytes=peak_gpu_bytes(),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  packages=imported_distributions())
    result.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
