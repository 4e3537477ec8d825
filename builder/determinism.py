"""Fixed CPU math settings for builds: applied before torch loads, recorded in the manifest."""

import os

# Kernels and thread count are pinned so that reductions split the same way on every machine. They decide
# last bits of every FP32 forward (calibration, GPTQ, eval.json), and the manifest records them: a change here
# bumps OUTPUT_VERSIONS["math"] (builder/release/identity.py), which every release's artifact_id carries.
ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels: AVX2 (falls back on older CPUs)
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # MKL conditional numerical reproducibility on its SSE2 branch, the one MKL documents for "Intel and
    # Intel compatible" CPUs alike: MKL honours branches other than AUTO and COMPATIBLE on Intel CPUs only
    # and silently runs AUTO elsewhere (AVX2,STRICT gave an AMD EPYC other GPTQ bytes than Intel machines).
    # GEMMs cost ~2.3x the AVX2 branch's (bench/mkl_branch.py); mkl_branch() checks MKL took it.
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
# Where large tensors' memory comes from, not what any value is (alignment stays a multiple of 64 B),
# so not recorded: torch backs allocations of 2 MB and more with huge pages, which cuts the kernel
# time of faulting in fresh tensors (a build reads and writes the model's size of them) ~2.5x.
ALLOCATOR = {"THP_MEM_ALLOC_ENABLE": "1"}
TORCH_THREADS = 2
SEED = 0
# mkl_cbwr.h's MKL_CBWR_* branch values, as mkl_branch() names them; MKL_CBWR_STRICT is bit 16
MKL_BRANCHES = {2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2",
                12: "AVX512", 14: "AVX512_E1"}
CUBLAS_WORKSPACE = ":4096:8"  # what torch.use_deterministic_algorithms asks of cuBLAS


def settings() -> dict:
    """What the manifest records about the numerical environment of a build."""
    return {"environment": dict(sorted(ENVIRONMENT.items())), "torch_threads": TORCH_THREADS, "seed": SEED}


def apply_environment() -> None:
    """Set the variables torch reads at import; call before the first `import torch`."""
    os.environ.update(ENVIRONMENT)
    os.environ.update(ALLOCATOR)


def mkl_branch():
    """The MKL code branch this process runs ("COMPATIBLE", "AUTO", "AUTO,STRICT", ...), as MKL itself
    reports it; None where torch has no MKL (non-x86 wheels), where MKL_CBWR means nothing."""
    import ctypes
    from pathlib import Path

    import torch

    libraries = sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
    try:
        get = ctypes.CDLL(str(libraries[0])).mkl_serv_cbwr_get
    except (IndexError, OSError, AttributeError):
        return None
    mode = get(-1)  # MKL_CBWR_ALL: branch and strict bit
    branch = MKL_BRANCHES.get(mode & 0xFFFF, str(mode & 0xFFFF))
    return f"{branch},STRICT" if mode & 0x10000 else branch


def apply_torch(devices: tuple = ()) -> None:
    """Pin torch's threads and seeds for this process; on a CUDA device also deterministic kernels
    (cuBLAS needs its workspace fixed before CUDA starts). CPU builds are left exactly as they were.
    BuilderError, before anything is computed, where MKL runs another branch than MKL_CBWR asks
    (torch imported before apply_environment, or an MKL that drops the branch): the bytes would
    then depend on the CPU."""
    import torch

    from builder.errors import BuilderError, Problem

    branch = mkl_branch()
    if branch not in (None, ENVIRONMENT["MKL_CBWR"]):
        raise BuilderError(Problem("builder/determinism.py", "MKL_CBWR",
                                   f"{ENVIRONMENT['MKL_CBWR']} asked, but MKL runs its {branch} branch in this "
                                   "process, whose last bits depend on the CPU; run the build through `builder` "
                                   "or `python -m builder`, which set MKL_CBWR before torch loads"))
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(SEED)
    if "cuda" in devices:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.manual_seed_all(SEED)


def devices(release) -> tuple:
    """release.devices (builder/release/release.py: the devices a build runs the model on, sorted);
    BuilderError when cuda is among them and torch sees no CUDA device, before anything is written."""
    from builder.errors import BuilderError, Problem

    used = release.devices
    if "cuda" in used:
        import torch

        if not torch.cuda.is_available():
            spec = release.spec
            group = "calibration" if spec.calibration.device == "cuda" and release.recipe.needs_calibration else "eval"
            raise BuilderError(Problem(f"specs/{group}/{getattr(spec.choices, group)}.yaml", f"{group}.device",
                                       "cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                                       f"build on a machine with one, or set {group}.device=cpu"))
    return used


def device_facts(devices: tuple) -> dict:
    """What provenance records of the GPU a build ran on (model, driver, CUDA): who built it, not
    what it is (the device kind is in the spec, hence in the artifact_id)."""
    if "cuda" not in devices:
        return {}
    import subprocess

    import torch

    facts = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        facts["driver"] = None
    return facts
