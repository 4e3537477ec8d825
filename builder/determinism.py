"""Fixed CPU math settings for builds: applied before torch loads, recorded in the manifest."""

import os

# Kernels and thread count are pinned so that reductions split the same way on every machine.
ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels: AVX2 (falls back on older CPUs)
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",             # MKL conditional numerical reproducibility
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
TORCH_THREADS = 2
SEED = 0


def settings() -> dict:
    """What the manifest records about the numerical environment of a build."""
    return {"environment": dict(sorted(ENVIRONMENT.items())), "torch_threads": TORCH_THREADS, "seed": SEED}


def apply_environment() -> None:
    """Set the variables torch reads at import; call before the first `import torch`."""
    os.environ.update(ENVIRONMENT)


def apply_torch() -> None:
    """Pin torch's threads and seeds for this process."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(SEED)
