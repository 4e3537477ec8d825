"""GPTQ's factor: the classic one of the inverse Hessian (Cholesky, torch.cholesky_inverse, an upper Cholesky;
llm-compressor's and the builder's before gptq 3) against the builder's (gptq 4: R with H = R Rᵀ, one Cholesky
of the reversed Hessian in its own memory; the column loop needs no inverse), on seeded Hessians of the
Linear input widths of bench/memory_scale.py's synthetic models. Same process, one after the other.

    python bench/gptq_factor.py [--sizes 2048,5504,4096,11008] [--rounds 1]

Printed per size: seconds of each (wall and CPU of this process), their ratio, how far R Rᵀ is from H
(largest difference relative to H's largest value), and the extra peak RSS each took over the Hessian.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's builder

from builder.quant import gptq  # noqa: E402


def hessian(size: int) -> torch.Tensor:
    """x xᵀ / tokens of seeded correlated inputs (2 × size tokens), dampened as GPTQ dampens it."""
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, 2 * size, generator=generator)
    h = x @ x.T / (2 * size)
    h.diagonal().add_(0.01 * h.diagonal().mean())
    return h


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(function, h: torch.Tensor) -> tuple:
    """(result, wall s, CPU s, extra peak RSS MB over what was resident before) of function(h)."""
    before = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(h)
    return result, time.perf_counter() - wall, time.process_time() - cpu, peak_mb() - before


def classic(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def builder(h: torch.Tensor) -> torch.Tensor:
    return gptq.upper_root(h, 0.01, "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,5504,4096,11008")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print("| columns | classic s (CPU) | builder s (CPU) | builder / classic | R Rᵀ - H: largest / H's largest | "
          "extra peak MB: classic / builder |\n|---:|---:|---:|---:|---:|---:|", flush=True)
    for size in (int(value) for value in args.sizes.split(",")):
        for _ in range(args.rounds):
            h = hessian(size)
            reference = h.clone()
            expected, c_wall, c_cpu, c_peak = timed(classic, h.clone())
            del expected
            found, b_wall, b_cpu, b_peak = timed(builder, h)  # consumed: computed in its memory
            difference = float((found @ found.T - reference).abs().max() / reference.abs().max())
            print(f"| {size} | {c_wall:.2f} ({c_cpu:.1f}) | {b_wall:.2f} ({b_cpu:.1f}) | {b_wall / c_wall:.2f}x | "
                  f"{difference:.1e} | {c_peak:.0f} / {b_peak:.0f} |", flush=True)
            del h, reference, found


if __name__ == "__main__":
    main()
