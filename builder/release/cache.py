"""A disk cache of pure computations, keyed by the bytes of everything they read.

Two things are kept: resolved specs (keyed by every file under specs/, the release and overrides,
the builder's code and schemas, and the packages that compose and validate: Hydra, OmegaConf, PyYAML,
pydantic) and a source model's architecture (keyed by its config.json bytes, the builder's code and
the packages that build the model: torch, transformers).
Any change to what a computation depends on misses the cache; errors are never cached.
BUILDER_CACHE=off disables it; it lives in $XDG_CACHE_HOME (or ~/.cache)/quant-release-builder/,
never in the repository.
"""

import json
import os
from pathlib import Path

from builder import atomic
from builder.release import identity
from builder.canonical import canonical_json, file_entries, sha256_bytes, sha256_file, tree_digest


def directory(kind: str = "resolved") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quant-release-builder" / kind


def key(root: Path, release: str, overrides: tuple) -> str:
    """Hex digest naming one resolution's inputs."""
    return digest_of({"specs": tree_digest(file_entries(root / "specs")), "release": release,
                      "overrides": list(overrides)})


# Packages a cached computation depends on (besides the builder's own code).
PACKAGES = ("hydra-core", "omegaconf", "pydantic", "pydantic-core", "pyyaml", "torch", "transformers")


def digest_of(parts: dict) -> str:
    """Hex digest of parts plus the builder's code digest and the versions of PACKAGES."""
    versions = {package: identity.installed(package) for package in PACKAGES}
    return sha256_bytes(canonical_json({**parts, "builder": identity.builder_digest(),
                                        "packages": versions})).split(":")[1]


def resolved(root: Path, release: str, overrides: tuple, compute) -> dict:
    """compute()'s result for these inputs, from the cache when an earlier run stored it."""
    return remembered("resolved", lambda: key(root, release, overrides), compute)


def architecture(config_file: Path, compute):
    """compute()'s result (JSON data) for a model's config.json, from the cache when stored."""
    return remembered("architecture", lambda: digest_of({"config": sha256_file(config_file)}), compute)


def folder_digest(path: Path) -> str:
    """tree_digest of a folder's files, remembered by their names, sizes, inodes and modification
    times (as DVC's state does): a lock of a 400 B model does not reread 800 GB."""
    stats = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        status = file.stat()
        stats.append([file.relative_to(path).as_posix(), status.st_size, status.st_ino, status.st_mtime_ns])
    return remembered("folders", lambda: digest_of({"folder": str(path.resolve()), "files": stats}),
                      lambda: tree_digest(file_entries(path)))


def remembered(kind: str, name, compute):
    """compute()'s JSON-able result, stored under kind/name() (name is only called when caching is on)."""
    if os.environ.get("BUILDER_CACHE") == "off":
        return compute()
    path = directory(kind) / f"{name()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    value = compute()
    try:  # best effort: a read-only or full cache folder only costs speed
        atomic.write_text(path, json.dumps(value, sort_keys=True))
    except OSError:
        pass
    return value
