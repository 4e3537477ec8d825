"""Whether MKL honours the builder's MKL_CBWR on this CPU, and what the vendor-independent branch costs.

    python bench/mkl_branch.py          (from the repository root; a subprocess per MKL_CBWR value)

For each value, a fresh process with the builder's other settings (builder/determinism.py) hashes the
result of a SmolLM2-sized GEMM (2048 x 576 x 1536, FP32) and a Cholesky (576), and times them (GEMM at
1536 too, 10-50 repeats). The same hash for AVX2,STRICT and AUTO means the AVX2 branch is not taken here,
so GEMM bits are not the ones an Intel AVX2 machine gives (BENCHMARKS.md, "Not carried to AMD CPUs").
"""

import hashlib
import os
import subprocess
import sys
import time

VALUES = ("AVX2,STRICT", "AVX2", "AVX512,STRICT", "AUTO", "COMPATIBLE")


def measure() -> str:
    import torch

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
    return f"{digest[:12]} | {gemm * 1e3:.1f} | {cholesky * 1e3:.1f}"


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from builder import determinism

    print("| MKL_CBWR | GEMM + Cholesky bits (sha256) | GEMM (ms) | Cholesky 1536 (ms) |\n|---|---|---:|---:|")
    for value in VALUES:
        env = {**os.environ, **determinism.ENVIRONMENT, "MKL_CBWR": value}
        line = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
        print(f"| `{value}` | {line} |")


if __name__ == "__main__":
    print(measure()) if sys.argv[1:] == ["--one"] else main()
