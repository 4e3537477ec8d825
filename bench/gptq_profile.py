"""Where GPTQ's time goes on one Linear: the Hessian's factorisation against the column loop, per shape,
under the builder's pinned math settings (builder/determinism.py), wall and CPU seconds.

    python bench/gptq_profile.py                      # the 2 GB synthetic Llama's Linears (hidden 2048)
    python bench/gptq_profile.py --hidden 4096 --intermediate 11008 --linears down
    python bench/gptq_profile.py --cprofile           # also the ten costliest calls of each

Random weights (N(0, 0.02)) and the Hessian of 512 random tokens (4 x 128, as bench/memory_scale.py
calibrates): the cost depends on the shapes, not on the values. CPU seconds count both of torch's
threads; on a loaded machine they also count OpenMP's spinning, so compare runs made side by side.
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder import determinism  # noqa: E402

determinism.apply_environment()

import torch  # noqa: E402
import yaml  # noqa: E402

from builder.quant import gptq  # noqa: E402
from builder.release.recipe import Recipe  # noqa: E402


def shapes(hidden: int, intermediate: int) -> dict:
    """name -> (rows, columns) of a Llama decoder layer's Linears (head_dim 64, GQA 4:1)."""
    return {"q": (hidden, hidden), "k": (hidden // 4, hidden), "o": (hidden, hidden),
            "gate": (intermediate, hidden), "down": (hidden, intermediate)}


def timed(run) -> tuple:
    """(result, wall seconds, CPU seconds) of run()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--linears", default="q,k,gate,down", help="comma-separated: q, k, o, gate, down")
    parser.add_argument("--recipe", default="w4a16-gptq", help="a shipped quant option with gptq settings")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    determinism.apply_torch()
    recipe = Recipe.of(yaml.safe_load((ROOT / "specs" / "quant" / f"{args.recipe}.yaml").read_text()))
    generator = torch.Generator().manual_seed(0)
    print("| Linear | rows x columns | factorise: wall / CPU s | column loop: wall / CPU s |\n|---|---|---:|---:|")
    for name in args.linears.split(","):
        rows, columns = shapes(args.hidden, args.intermediate)[name]
        x = torch.randn(args.tokens, columns, generator=generator)
        hessian, weight = x.T @ x, torch.randn(rows, columns, generator=generator) * 0.02
        profile = cProfile.Profile() if args.cprofile else None
        if profile:
            profile.enable()
        factor, *factorising = timed(lambda: gptq.factorise(hessian, recipe.gptq, name))
        _, *looping = timed(lambda: gptq.round_weight(weight, factor, recipe))
        print(f"| {name} | {rows} x {columns} | {factorising[0]:.2f} / {factorising[1]:.2f} "
              f"| {looping[0]:.2f} / {looping[1]:.2f} |", flush=True)
        if profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    main()
