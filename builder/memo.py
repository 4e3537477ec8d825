"""A disk cache of resolved specs, keyed by the bytes of everything resolution reads.

The key covers every file under specs/, the release and overrides, the builder's own code and
schemas, and the toolchain (Hydra, OmegaConf): any change to what resolution depends on misses the
cache. Errors are never cached. BUILDER_CACHE=off disables it; it lives in $XDG_CACHE_HOME (or
~/.cache)/quant-release-builder/, never in the repository.
"""

import json
import os
from pathlib import Path

from builder import identity
from builder.canonical import canonical_json, file_entries, sha256_bytes, tree_digest


def directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quant-release-builder" / "resolved"


def key(root: Path, release: str, overrides: tuple) -> str:
    """Hex digest naming one resolution's inputs."""
    return sha256_bytes(canonical_json({
        "specs": tree_digest(file_entries(root / "specs")), "release": release, "overrides": list(overrides),
        "builder": identity.builder_digest(), "toolchain": identity.toolchain()})).split(":")[1]


def resolved(root: Path, release: str, overrides: tuple, compute) -> dict:
    """compute()'s result for these inputs, from the cache when an earlier run stored it."""
    if os.environ.get("BUILDER_CACHE") == "off":
        return compute()
    path = directory() / f"{key(root, release, overrides)}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    spec = compute()
    try:  # best effort: a read-only or full cache folder only costs speed
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(spec, sort_keys=True), encoding="utf-8")
        temporary.replace(path)
    except OSError:
        pass
    return spec
