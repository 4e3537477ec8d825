"""Benchmark against llm-compressor on the same model, data, sample count and sequence length: per recipe
wall time and peak RSS of the whole process, perplexity and mean KL (both evaluated by builder.evaluate).

    python bench/compare.py [--recipes fp8-dynamic,fp8-static] [--samples 64] [--length 512] [--eval-samples 32]
        [--llmc /work/venvs/llmc/bin/python] [--json bench/results.json]     (run from the repository root)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
RECIPES = ("fp8-dynamic", "fp8-static", "w8a8-int8", "w4a16", "w4a16-gptq")
CALIBRATED = ("fp8-static", "w4a16-gptq")  # recipes whose release reads calibration data
GNU_TIME = "/usr/bin/time"


def measured(command: list, env: dict | None = None) -> dict:
    """Run a command; its wall time (s) and the peak RSS (bytes) of its process, as GNU time reports it.

    Not wait4 on our own child: Linux carries the parent's high-water RSS into a forked child's ru_maxrss
    (exec records the copied address space's peak), so a child of this process, which holds two FP32
    models after an evaluation, would report at least this process's peak. GNU time is a small process:
    its child's figure is its own.
    """
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} not found: install GNU time (Debian: apt install time)")
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()  # a file, not a pipe, for the log: a chatty child never blocks on it
        status = subprocess.run([GNU_TIME, "-q", "-f", "%M", "-o", peak.name, *command], cwd=ROOT,
                                env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log).returncode
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read().decode(errors='replace')[-3000:]}")
        kilobytes = int(peak.read().split()[-1])
    return {"seconds": round(seconds, 1), "peak_rss_bytes": kilobytes * 1024}


def ours(recipe: str, out: Path, samples: int, length: int) -> dict:
    overrides = ["eval=none"]  # evaluated below, like theirs, outside the timed run
    if recipe in CALIBRATED:
        overrides += [f"calibration.samples={samples}", f"calibration.sequence_length={length}"]
    return measured([sys.executable, "-m", "builder", "build", f"{MODEL}-{recipe}", *overrides,
                     "--out", str(out), "--force"])


def theirs(llmc: str, recipe: str, ids_file: Path, out: Path, source: Path = ROOT / "weights" / MODEL,
           group_size: int = 64) -> dict:
    """llm-compressor's oneshot of recipe on source, in its own venv, measured whole."""
    return measured([llmc, str(ROOT / "bench" / "llmcompressor_side.py"), recipe, str(source), str(ids_file), str(out),
                     str(group_size)])


def windows(group: str, option: str, samples: int, length: int):
    """The token windows builder.data selects for a shipped calibration/eval option, resized."""
    import yaml

    from builder.source import data

    spec = {**yaml.safe_load((ROOT / "specs" / group / f"{option}.yaml").read_text()),
            "samples": samples, "sequence_length": length}
    return data.samples(ROOT, spec, ROOT / "weights" / MODEL, file=f"specs/{group}/{option}.yaml", group=group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32, help="0: time the builds only")
    parser.add_argument("--llmc", default="/work/venvs/llmc/bin/python")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    from builder import determinism
    from builder.quant import evaluate

    determinism.apply_environment()
    determinism.apply_torch()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        scratch = Path(scratch)
        ids_file = scratch / "calibration.safetensors"
        save_file({"input_ids": windows("calibration", "licenses", args.samples, args.length).contiguous()},
                  ids_file)
        eval_ids = windows("eval", "docstrings", args.eval_samples, args.length) if args.eval_samples else None
        for recipe in args.recipes.split(","):
            for side, run in (("ours", lambda out: ours(recipe, out, args.samples, args.length)),
                              ("llm-compressor", lambda out: theirs(args.llmc, recipe, ids_file, out))):
                out = scratch / f"{side}-{recipe}"
                row = {"recipe": recipe, "side": side, **run(out)}
                if eval_ids is not None:
                    quality = evaluate.measure(ROOT / "weights" / MODEL, out, eval_ids)
                    row.update(perplexity=quality["perplexity"]["artifact"],
                               source_perplexity=quality["perplexity"]["source"],
                               perplexity_increase_pct=quality["perplexity_increase_pct"], mean_kl=quality["mean_kl"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    print(table(rows))


def table(rows: list) -> str:
    """Markdown: one line per recipe and side (quality columns when the run evaluated)."""
    columns = (("recipe", "---", lambda r: r["recipe"]), ("tool", "---", lambda r: r["side"]),
               ("wall time (s)", "---:", lambda r: r["seconds"]),
               ("peak RSS (GB)", "---:", lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}"))
    quality = (("perplexity", "---:", lambda r: f"{r['perplexity']:.3f}"),
               ("increase", "---:", lambda r: f"{r['perplexity_increase_pct']:+.2f} %"),
               ("mean KL", "---:", lambda r: f"{r['mean_kl']:.4f}"))
    return markdown(rows, columns + (quality if all("perplexity" in r for r in rows) else ()))


def markdown(rows: list, columns: tuple) -> str:
    """A Markdown table of rows; columns are (header, alignment such as "---:", cell function)."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join(align for _, align, _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell(row)) for _, _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
