"""Calibration, GPTQ and evaluation on a CUDA GPU: the same bytes twice, quality next to the CPU builds.

    python bench/gpu_check.py [--releases smollm2-135m-instruct-fp8-static,smollm2-135m-instruct-w4a16-gptq]
                              [--work DIR] [--skip-cpu]          (run from the repository root, venv active)

For each release: builds it twice with `calibration.device=cuda eval.device=cuda` (one decoder layer on
the GPU at a time, deterministic kernels), checks the two content digests are identical, builds it on
the CPU (or reuses artifacts/<release> when it is current), and prints a Markdown table of wall times,
perplexity and mean KL of the GPU and CPU builds. About 5 minutes on one GPU for the two SmolLM2
releases (most of it the CPU builds). On a machine without CUDA it says so and exits 0.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("smollm2-135m-instruct-fp8-static", "smollm2-135m-instruct-w4a16-gptq")
ON_GPU = ("calibration.device=cuda", "eval.device=cuda")


def cuda() -> str | None:
    """The GPU torch sees, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def build(release: str, out: Path, overrides: tuple = ()) -> dict:
    """One `builder build`, timed whole; its manifest and eval.json."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "builder", "build", release, *overrides, "--out", str(out),
                             "--force"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{release} {' '.join(overrides)}:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    return {"seconds": round(seconds, 1), "content_digest": manifest["content_digest"],
            "perplexity": evaluation.get("perplexity", {}).get("artifact"), "mean_kl": evaluation.get("mean_kl")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", default=",".join(RELEASES))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--skip-cpu", action="store_true", help="compare GPU builds with each other only")
    args = parser.parse_args()
    gpu = cuda()
    if gpu is None:
        print("no CUDA device (torch.cuda.is_available() is False): nothing to check on this machine")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows, identical = [], True
    for release in args.releases.split(","):
        first = build(release, work / f"{release}-gpu-1", ON_GPU)
        second = build(release, work / f"{release}-gpu-2", ON_GPU)
        same = first["content_digest"] == second["content_digest"]
        identical &= same
        cpu = None if args.skip_cpu else build(release, work / f"{release}-cpu")
        rows.append((release, first, second, same, cpu))
    print(f"GPU: {gpu}\n")
    print("| release | GPU build 1 (s) | GPU build 2 (s) | identical | GPU perplexity | GPU KL | CPU (s) | "
          "CPU perplexity | CPU KL |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for release, first, second, same, cpu in rows:
        cpu_cells = [cpu["seconds"], cpu["perplexity"], cpu["mean_kl"]] if cpu else ["", "", ""]
        print(f"| {release} | {first['seconds']} | {second['seconds']} | {'yes' if same else 'NO'} | "
              f"{first['perplexity']} | {first['mean_kl']} | " + " | ".join(map(str, cpu_cells)) + " |")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
