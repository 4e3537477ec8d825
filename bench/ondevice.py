"""llama.cpp and mlx-lm read the GGUF and MLX artifacts: logits of tiny models of every covered family
against their source's, and for built SmolLM2 artifacts greedy generation and perplexity on the eval
text, next to the vLLM-target artifacts of the same recipe family. Results: BENCHMARKS.md.

    python bench/ondevice.py families [--llama /work/venvs/llama/bin/python] [--mlx /work/venvs/mlx/bin/python]
    python bench/ondevice.py smollm2 artifacts/smollm2-135m-instruct-gguf-q8_0 ... [--windows 8 --length 512]
        [--mlx-windows 2 --mlx-length 128] [--max-tokens 32] [--vllm /work/venvs/vllm/bin/python] [--transformers-only NAME ...]

Each runtime runs in its own venv (bench/ondevice_runtime.py, bench/vllm_check.py --score); the same
token ids go to every runtime and to transformers (FP32, the builder's evaluation loader), so the
perplexities compare artifacts, not tokenizers. Run from the repository root; heavy: run it alone.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Repo, release_text  # noqa: E402  (the tests' repository maker)

FAMILY_KINDS = ("tiny-llama", "tiny-llama-bias", "tiny-mistral", "tiny-qwen2", "tiny-qwen3")
# variant -> (quant option, release keys): every type the two writers produce
VARIANTS = {
    "gguf-f32": ("gguf-q8_0", {"quant": {"weights": None, "algorithm": None, "dtype": "float32"}}),
    "gguf-bf16": ("gguf-q8_0", {"quant": {"weights": None, "algorithm": None}}),
    "gguf-q8_0": ("gguf-q8_0", {}),
    "gguf-q4_0": ("gguf-q4_0", {"quant": {"algorithm": "rtn"}}),
    "gguf-q4_0-imatrix": ("gguf-q4_0", {"calibration": {"samples": 4, "sequence_length": 64}}),
    "mlx-f32": ("mlx-4bit", {"quant": {"weights": None, "algorithm": None, "dtype": "float32"}}),
    "mlx-8bit": ("mlx-4bit", {"quant": {"weights": {"num_bits": 8}}}),
    "mlx-4bit": ("mlx-4bit", {}),
    "mlx-mxfp4": ("mlx-mxfp4", {}),
    "mlx-nvfp4": ("mlx-nvfp4", {}),
    "mlx-mxfp8": ("mlx-mxfp8", {}),
}
# the target that loads a recipe (mlx's float modes: mlx-fp)
TARGETS = {"gguf-q8_0": "llama-cpp", "gguf-q4_0": "llama-cpp", "mlx-4bit": "mlx"}
PROMPTS = {"completion": "The capital of France is", "chat": "What is the capital of France?"}


def runtime_of(artifact: Path) -> str:
    fmt = json.loads((artifact / "release.json").read_text())["quant"]["format"]
    return {"gguf": "llama", "mlx": "mlx"}.get(fmt, "vllm")


def run(python: str, runtime: str, artifact: Path, job: dict, work: Path) -> dict:
    """The runtime's result for a job, from its own venv (bench/ondevice_runtime.py, or vllm_check.py)."""
    job_file, out_file = work / f"{artifact.name}.job.json", work / f"{artifact.name}.{runtime}.json"
    job_file.write_text(json.dumps(job))
    if runtime == "vllm":
        command = [python, str(ROOT / "bench" / "vllm_check.py"), "--score", str(job_file), str(out_file), str(artifact)]
    else:
        command = [python, str(ROOT / "bench" / "ondevice_runtime.py"), runtime, str(artifact), str(job_file), str(out_file)]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    return json.loads(out_file.read_text())


def transformers_logits(path: Path, windows: list):
    """[window] -> FP32 logits, from the builder's evaluation loader (dequantizes every format)."""
    import torch

    from builder.check import evaluate

    model = evaluate.load_model(path)
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0].to(torch.float32) for w in windows]


def compare(reference, logits) -> tuple:
    """(max |logit difference|, mean KL(reference || logits)) over every position of every window."""
    import torch

    worst, kl, count = 0.0, 0.0, 0
    for ref, got in zip(reference, logits):
        got = torch.tensor(got, dtype=torch.float32) if not isinstance(got, torch.Tensor) else got
        worst = max(worst, float((ref - got).abs().max()))
        p, q = ref.log_softmax(-1), got.log_softmax(-1)
        kl += float((p.exp() * (p - q)).sum())
        count += ref.shape[0]
    return worst, kl / count


def families(args) -> None:
    """Tiny models of every covered family, every variant: runtime logits vs source and vs transformers."""
    import torch
    import yaml

    work = Path(tempfile.mkdtemp(prefix="ondevice-"))
    repo = Repo.fresh(work / "repo")
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0)).tolist()
    print("| model | artifact | runtime | vs source: max abs logit diff | KL | vs transformers' reading: max | KL |")
    print("|---|---|---|---:|---:|---:|---:|")
    from builder import build

    for kind in FAMILY_KINDS:
        repo.add_model(kind, tokenizer="bpe")
        source = transformers_logits(repo.root / "weights" / kind, windows)
        for variant, (quant, extra) in VARIANTS.items():
            name, runtime = f"{kind}-{variant}", "llama" if variant.startswith("gguf") else "mlx"
            text = release_text(name, kind, quant, TARGETS.get(quant, "mlx-fp"))
            if "imatrix" in variant:
                text = text.replace("\n\nrelease:", "\n  - override /calibration: licenses\n\nrelease:")
            (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + (yaml.safe_dump(extra) if extra else ""))
            build.build(repo.root, name, log=lambda message: None)
            artifact = repo.root / "artifacts" / name
            result = run(getattr(args, runtime), runtime, artifact, {"windows": windows, "logits": True}, work)
            got = [w["logits"] for w in result["windows"]]
            row = [*compare(source, got)]
            try:
                row += [*compare(transformers_logits(artifact, windows), got)]
            except Exception as error:  # transformers' GGUF reader misses qwen3's head_dim (key_length)
                row += [f"n/a ({type(error).__name__})", ""]
            cells = [f"{v:.2e}" if isinstance(v, float) else v for v in row]
            print(f"| {kind} | {variant} | {runtime} | {' | '.join(cells)} |", flush=True)
    if not args.keep:
        shutil.rmtree(work)


def smollm2(args) -> None:
    """Greedy generation and perplexity of built SmolLM2 artifacts in their runtimes, on the same ids."""
    from builder.source import data
    from builder.release.resolve import resolve

    spec = resolve(ROOT, "smollm2-135m-instruct-fp8-static")  # its eval group: docstrings
    ids = data.samples(ROOT, spec["eval"], ROOT / spec["model"]["path"], file="specs/eval/docstrings.yaml", group="eval")
    windows = ids[: args.windows, : args.length].tolist()
    short = ids[: args.mlx_windows, : args.mlx_length].tolist()
    work = Path(tempfile.mkdtemp(prefix="ondevice-"))
    rows = []
    source_nll = {}
    for key, chosen in (("long", windows), ("short", short)):
        logits = transformers_logits(ROOT / spec["model"]["path"], chosen)
        source_nll[key] = perplexity(logits, chosen)
    for artifact in map(Path, args.artifacts):
        runtime = runtime_of(artifact)
        python = getattr(args, runtime)
        chosen = short if runtime == "mlx" else windows
        job = {"windows": chosen, "prompts": PROMPTS, "fp32": True, "max_tokens": args.max_tokens}
        if python is None or artifact.name in args.transformers_only:  # e.g. W4A16: vLLM's AVX2 CPU build lacks its ops
            runtime, result = f"({runtime}: not run)", {"load_s": math.nan, "perplexity": math.nan}
        else:
            try:
                result = run(python, runtime, artifact, job, work)
            except subprocess.CalledProcessError as error:  # reported in the table; the other rows still run
                result = {"load_s": math.nan, "perplexity": math.nan, "completion": {"text": f"failed (exit {error.returncode})"}}
        ours = perplexity(transformers_logits(artifact, chosen), chosen)
        rows.append((artifact.name, runtime, result, ours, source_nll["short" if chosen is short else "long"]))
        print(json.dumps({"artifact": artifact.name, **{k: v for k, v in result.items() if not k.startswith("windows")},
                          "transformers_perplexity": ours}), flush=True)
    print(f"\nwindows: {len(windows)} x {len(windows[0])} tokens (mlx: {len(short)} x {len(short[0])}) of data/eval.txt")
    print("| artifact | runtime | load s | completion | chat | perplexity (runtime) | (fp32 cast) | perplexity (transformers FP32) | source |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|")
    for name, runtime, result, ours, source in rows:
        fp32 = result.get("perplexity_fp32")
        print(f"| {name} | {runtime} | {result['load_s']:.1f} | {result.get('completion', {}).get('text', '')!r} | "
              f"{result.get('chat', {}).get('text', '')!r} | {result['perplexity']:.3f} | "
              f"{'' if fp32 is None else f'{fp32:.3f}'} | {ours:.3f} | {source:.3f} |")
    if not args.keep:
        shutil.rmtree(work)


def perplexity(logits: list, windows: list) -> float:
    import torch

    total, count = 0.0, 0
    for got, ids in zip(logits, windows):
        log_probs = got[:-1].log_softmax(-1).to(torch.float64)
        total -= float(log_probs.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("families", "smollm2"))
    parser.add_argument("artifacts", nargs="*")
    parser.add_argument("--llama", default="/work/venvs/llama/bin/python")
    parser.add_argument("--mlx", default="/work/venvs/mlx/bin/python")
    parser.add_argument("--vllm", default=None)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--mlx-windows", type=int, default=2)
    parser.add_argument("--mlx-length", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--transformers-only", nargs="*", default=[], metavar="ARTIFACT_NAME",
                        help="artifacts measured with transformers only (their runtime cannot run here)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    {"families": families, "smollm2": smollm2}[args.command](args)


if __name__ == "__main__":
    main()
