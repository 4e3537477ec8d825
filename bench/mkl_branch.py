"""Which branch MKL runs for each MKL_CBWR value on this CPU, and what the builder's (COMPATIBLE) costs.

    python bench/mkl_branch.py          (from the repository root; a subprocess per MKL_CBWR value)

For each value, a fresh process with the builder's other settings (builder/determinism.py) reports the
branch MKL says it runs (determinism.mkl_branch), hashes the result of a SmolLM2-sized GEMM
(2048 x 576 x 1536, FP32) and a Cholesky (576), and times them (Cholesky at 1536, 10-50 repeats). On a
non-Intel CPU every value but AUTO and COMPATIBLE falls back to AUTO: same branch, same bits
(BENCHMARKS.md, "Across CPU vendors").
"""

import hashlib
import os
import subprocess
import sys
import time

VALUES = ("COMPATIBLE", "AVX2,STRICT", "AVX2", "AVX512,STRICT", "AUTO")


def measure() -> str:
    import torch

    from builder import determinism

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 576, generator=generator), torch.randn(1536, 576, generator=generator)
    h = torch.randn(576, 576, generator=generator)
    h = h @ h.T + 576 * torch.eye(576)
    digest = hashlib.sha256((a @ b.T).numpy().tobytes() + torch.linalg.cholesky(h).numpy().tobytes()).hexdigest()
    large = torch.randn(1536, 1536, generator=generator)
    large = large @ large.T + 1536 * torch.eye(1536)
    start = time.perf_counter()
    for _ in range(50):
        a @ b.T
    gemm = (time.perf_counter() - start) / 50
    start = time.perf_counter()
    for _ in range(10):
        torch.linalg.cholesky(large)
    cholesky = (time.perf_counter() - start) / 10
    return f"{determinism.mkl_branch()} | {digest[:12]} | {gemm * 1e3:.1f} | {cholesky * 1e3:.1f}"


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from builder import determinism

    print("| MKL_CBWR | branch MKL runs | GEMM + Cholesky bits (sha256) | GEMM (ms) | Cholesky 1536 (ms) |\n"
          "|---|---|---|---:|---:|")
    for value in VALUES:
        env = {**os.environ, **determinism.ENVIRONMENT, "MKL_CBWR": value, "PYTHONPATH": os.getcwd()}
        line = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
        print(f"| `{value}` | {line} |")


if __name__ == "__main__":
    print(measure()) if sys.argv[1:] == ["--one"] else main()
