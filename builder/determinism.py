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
# Where large tensors' memory comes from, not what any value is (alignment stays a multiple of 64 B),
# so not recorded: torch backs allocations of 2 MB and more with huge pages, which cuts the kernel
# time of faulting in fresh tensors (a build reads and writes the model's size of them) ~2.5x.
ALLOCATOR = {"THP_MEM_ALLOC_ENABLE": "1"}
TORCH_THREADS = 2
SEED = 0


def settings() -> dict:
    """What the manifest records about the numerical environment of a build."""
    return {"environment": dict(sorted(ENVIRONMENT.items())), "torch_threads": TORCH_THREADS, "seed": SEED}


def apply_environment() -> None:
    """Set the variables torch reads at import; call before the first `import torch`."""
    os.environ.update(ENVIRONMENT)
    os.environ.update(ALLOCATOR)


def apply_torch() -> None:
    """Pin torch's threads and seeds for this process."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(SEED)
