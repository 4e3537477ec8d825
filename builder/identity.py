"""The artifact_id: one hash over the resolved spec and every input a build reads. Pure."""

from functools import cache
from importlib import metadata
from pathlib import Path

import builder
from builder.canonical import canonical_json, file_entries, sha256_bytes, sha256_file, tree_digest
from builder.errors import BuilderError, Problem
from builder.paths import PACKAGE_DIR, SCHEMAS_DIR, inside

# Packages whose versions can change the bytes of an artifact (pinned exactly in pyproject.toml).
TOOLCHAIN = ("compressed-tensors", "hydra-core", "numpy", "omegaconf", "safetensors", "torch",
             "transformers")
CODE_SUFFIXES = (".py", ".json", ".yaml")


@cache  # the builder's files do not change under a running process; `lock` asks once per release
def builder_digest() -> str:
    """Digest of the builder's own source files and schemas (bytecode caches excluded)."""
    entries = []
    for base, prefix in ((PACKAGE_DIR, "builder"), (SCHEMAS_DIR, "schemas")):
        for entry in file_entries(base):
            if entry["path"].endswith(CODE_SUFFIXES) and "__pycache__" not in entry["path"]:
                entries.append({**entry, "path": f"{prefix}/{entry['path']}"})
    return tree_digest(entries)


@cache  # installed versions do not change under a running process; `lock` asks once per release
def toolchain() -> dict:
    """Installed versions of the toolchain packages, read from package metadata (no imports)."""
    return {name: metadata.version(name) for name in TOOLCHAIN}


def data_digests(root: Path, spec: dict, release_file: str) -> dict:
    """sha256 of every data file the spec names (calibration, evaluation), by repository path."""
    digests = {}
    for group in ("calibration", "eval"):
        relative = spec[group]["dataset"]
        if relative is None:
            continue
        path = inside(root, relative, file=release_file, key=f"{group}.dataset")
        if not path.is_file():
            raise BuilderError(Problem(f"specs/{group}/{spec['choices'][group]}.yaml",
                                       f"{group}.dataset", f"{relative!r}: no such file"))
        digests[relative] = sha256_file(path)
    return digests


def inputs(root: Path, spec: dict) -> dict:
    """Everything besides the spec that determines the artifact's bytes."""
    release_file = f"specs/release/{spec['choices']['release']}.yaml"
    return {
        "weights": {"path": spec["model"]["path"], "digest": spec["model"]["digest"]},
        "data": data_digests(root, spec, release_file),
        "builder": {"version": builder.__version__, "digest": builder_digest()},
        "toolchain": dict(toolchain()),
    }


def artifact_id(spec: dict, build_inputs: dict) -> str:
    """sha256 of the canonical JSON of {spec, inputs}: known before anything is built."""
    return sha256_bytes(canonical_json({"spec": spec, "inputs": build_inputs}))
