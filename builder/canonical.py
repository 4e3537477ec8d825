"""Canonical JSON and sha256 digests: the byte-level vocabulary of identity."""

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time when hashing files


def canonical_json(value) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that get hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pretty_json(value) -> str:
    """Sorted, indented JSON with a final newline: the form written for people to read."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_entries(root: Path, exclude: frozenset = frozenset()) -> list:
    """Every regular file under root as {path, sha256, size}, sorted by relative POSIX path."""
    relatives = [p.relative_to(root).as_posix() for p in sorted(p for p in root.rglob("*") if p.is_file())]
    return [file_entry(root, relative) for relative in relatives if relative not in exclude]


def file_entry(root: Path, relative: str) -> dict:
    """{path, sha256, size} of one file under root."""
    path = root / relative
    return {"path": relative, "sha256": sha256_file(path), "size": path.stat().st_size}


def tree_digest(entries: list) -> str:
    """Digest of a file list: sha256 of the canonical JSON of its sorted (path, sha256, size) rows."""
    rows = sorted([e["path"], e["sha256"], e["size"]] for e in entries)
    return sha256_bytes(canonical_json(rows))
