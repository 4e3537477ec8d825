"""How much MKL's branch alone moves a release's eval figures: the same built artifact, measured on its
own eval windows in one fresh process per MKL_CBWR value (the builder's other settings kept).

    python bench/eval_branch.py smollm2-135m-instruct-w8a8-int8 [--values 'COMPATIBLE;AVX2,STRICT']

Needs artifacts/<release>/ built (dvc repro or builder build). The weights are the same bytes in every
row, so any difference is the evaluation's own arithmetic (BENCHMARKS.md, "Across CPU vendors").
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def measure(release: str) -> dict:
    import torch

    from builder import build, determinism
    from builder.check import evaluate
    from builder.release import lock
    from builder.source import load

    torch.set_num_threads(determinism.TORCH_THREADS)
    spec = lock.locked(Path("."), release, ()).spec.data()
    source = load.source_dir(Path("."), spec)
    result = evaluate.measure(source, Path("artifacts") / release, build.data_samples(Path("."), spec, source, "eval"))
    return {"branch": determinism.mkl_branch(), "perplexity_increase_pct": result["perplexity_increase_pct"],
            "mean_kl": result["mean_kl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release")
    parser.add_argument("--values", default="COMPATIBLE;AVX2,STRICT",
                        help="MKL_CBWR values, separated by ';' (default: math 3's and math 2's)")
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    from builder import determinism

    print("| MKL_CBWR | branch MKL runs | perplexity increase (%) | mean KL |\n|---|---|---:|---:|")
    for value in args.values.split(";"):
        env = {**os.environ, **determinism.ENVIRONMENT, "MKL_CBWR": value, "PYTHONPATH": os.getcwd()}
        out = subprocess.run([sys.executable, __file__, "--one", args.release], env=env, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"| `{value}` | {row['branch']} | {row['perplexity_increase_pct']:.3f} | {row['mean_kl']:.5f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(sys.argv[2])))
    else:
        main()
