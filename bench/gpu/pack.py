"""Pack what the GPU machine lacks: wheels for its Python (3.12), into bench/gpu/wheels/ (git-ignored).

    python bench/gpu/pack.py [--dest bench/gpu/wheels] [--python-version 3.12] [--no-recompress]

Two sets, each downloaded with `pip download --only-binary=:all: --no-deps` for the target Python and
manylinux x86_64, never torch nor anything the machine has (MACHINE and what it requires):
- BUILDER: what a calibrated build imports (or reads the version of) that the machine lacks, at the
  versions this project pins (pyproject.toml) or, for their own dependencies, the versions the project's
  venv holds (tests/test_gpu_kit.py derives this set from a dry run's builds and checks it).
- LLMC: llm-compressor 0.14 and what its oneshot GPTQ imports that the machine lacks; compressed-tensors
  0.19 (the builder pins 0.17: the two live in two venvs on the machine, see run.sh).
Wheels larger than RECOMPRESS_BYTES are rewritten with LZMA compression (the same files, the same
RECORD; pip and Python's zipfile read it): pyarrow's 49 MB become ~36 MB, so that the wheels and the
working tree travel within 50 MiB (the device tool takes 64 MiB). Prints each wheel's size and the total
with the working tree that travels (`git ls-files` plus the untracked files git does not ignore).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEST = HERE / "wheels"
MIB = 1 << 20
LIMIT_MIB = 50
RECOMPRESS_BYTES = 8 * MIB
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")
# What the GPU machines have (../shared/FACTS.md, 2026-12-06), besides Python 3.12 and pip; pip put
# their requirements there too, except ABSENT, which the machines are known to lack.
MACHINE = ("torch", "transformers", "safetensors", "tokenizers", "huggingface-hub", "accelerate", "numpy",
           "pyyaml", "tqdm", "jinja2", "psutil", "pandas", "pytest")
ABSENT = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "jsonschema", "jsonschema-specifications",
          "referencing", "rpds-py", "attrs", "compressed-tensors", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "gguf", "submitit", "llmcompressor")
# Modules a build imports only because they happen to be installed (torch's graph drawing, its
# inductor's terminal colours, accelerate's optional protobuf check): a build runs without them.
OPTIONAL = {"pydot": "torch.fx's graph drawer, imported when installed",
            "colorama": "torch._inductor's terminal colours, imported when installed",
            "protobuf": "accelerate checks whether it is installed",
            "pillow": "transformers' image utilities, imported when installed (the test extra's matplotlib brings it)",
            # the tasks extra's dependencies: transformers imports scikit-learn (and these with it) whenever it is
            # installed; the kit's releases name no tasks and never call them
            **dict.fromkeys(("scikit-learn", "scipy", "joblib", "threadpoolctl", "narwhals", "pyarrow", "cloudpickle",
                             "dill", "multiprocess", "xxhash", "python-dateutil", "pytz", "six", "pandas", "charset-normalizer"),
                            "imported by transformers or datasets when installed (the tasks extra)")}
BUILDER = {
    "hydra-core": "1.3.8", "omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3", "attrs": "26.1.0",
    "compressed-tensors": "0.17.0",  # its version goes into config.json; transformers loads it for the smoke check
    "loguru": "0.7.3",               # compressed-tensors' logging
    # the spec's typed models (builder/release/models.py)
    "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
}
# What llm-compressor's oneshot GPTQ imports that the machine lacks (llmcompressor imports datasets at
# import time; datasets imports pyarrow, dill, multiprocess, xxhash; both import requests, which
# huggingface_hub 1.x no longer brings). Checked by running it in a venv that sees only the machine's
# packages and these wheels (README.md). bench/requirements-llmc.txt's versions where it pins; pyarrow
# the oldest datasets 5.2 accepts (the smallest wheel).
LLMC = {
    "llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0", "loguru": "0.7.3",
    "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    "datasets": "5.2.0", "pyarrow": "24.0.0", "dill": "0.4.1", "multiprocess": "0.70.19", "xxhash": "4.1.0",
    "requests": "2.34.2", "urllib3": "2.8.0", "charset-normalizer": "3.5.3",
}
SETS = {"builder": BUILDER, "llmc": LLMC}
# Published as a source distribution only (pure Python): built into a py3-none-any wheel here.
SOURCE_ONLY = ("antlr4-python3-runtime",)


def wheel_prefix(name: str, version: str) -> str:
    """How a wheel of name==version begins (wheel file names write - _ . runs in names as _)."""
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-"


def drop_stale(requirements: dict, dest: Path) -> None:
    """Remove wheels an earlier pack left that the list no longer names (run.sh installs them all)."""
    prefixes = tuple(wheel_prefix(name, version).lower() for name, version in requirements.items())
    for wheel in dest.glob("*.whl"):
        if not wheel.name.lower().startswith(prefixes):
            wheel.unlink()


def download(requirements: dict, dest: Path, python_version: str) -> None:
    """pip download the exact versions, binary wheels for the target Python, no dependencies (those
    published as source only: pip wheel builds their pure-Python wheel)."""
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    pinned = {name: f"{name}=={version}" for name, version in sorted(requirements.items())
              if not list(dest.glob(wheel_prefix(name, version) + "*.whl"))}  # a rerun keeps what it has
    if not pinned:
        return
    binary = [pin for name, pin in pinned.items() if name not in SOURCE_ONLY]
    if binary:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                        "--python-version", python_version, "--implementation", "cp", *platforms, "--dest", str(dest),
                        *binary], check=True)
    built = [pin for name, pin in pinned.items() if name in SOURCE_ONLY]
    if built:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), *built],
                       check=True)


def recompress(wheel: Path) -> None:
    """Rewrite a wheel with LZMA: every member's bytes and metadata kept (RECORD's hashes still hold)."""
    with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".part", delete=False) as handle:
        part = Path(handle.name)
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(part, "w", compression=zipfile.ZIP_LZMA) as target:
        if all(info.compress_type == zipfile.ZIP_LZMA for info in source.infolist()):
            part.unlink()
            return
        for info in source.infolist():
            target.writestr(info, source.read(info), compress_type=zipfile.ZIP_LZMA)
    part.replace(wheel)


def tree_bytes() -> int:
    """Bytes of the working tree that travels: tracked files plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--no-recompress", action="store_true", help="keep pip's wheels as they are")
    args = parser.parse_args()
    for name, requirements in SETS.items():
        folder = args.dest / name
        folder.mkdir(parents=True, exist_ok=True)
        drop_stale(requirements, folder)
        download(requirements, folder, args.python_version)
    wheels = sorted(args.dest.rglob("*.whl"))
    for wheel in wheels:
        if not args.no_recompress and wheel.stat().st_size > RECOMPRESS_BYTES:
            print(f"recompressing {wheel.name} ({wheel.stat().st_size / MIB:.1f} MiB) with LZMA ...", flush=True)
            recompress(wheel)
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / MIB:8.2f} MiB  {wheel.relative_to(args.dest)}")
    tree = tree_bytes()
    print(f"wheels {total / MIB:.2f} MiB + working tree {tree / MIB:.2f} MiB = {(total + tree) / MIB:.2f} MiB "
          f"(limit {LIMIT_MIB} MiB)")
    return 0 if total + tree <= LIMIT_MIB * MIB else 1


if __name__ == "__main__":
    sys.exit(main())
