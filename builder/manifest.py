"""manifest.json: what an artifact is (artifact_id, inputs) and what it holds (every file, digest)."""

import json
from pathlib import Path

from builder import determinism
from builder.canonical import canonical_json, file_entries, pretty_json, sha256_bytes, tree_digest

NAME = "manifest.json"
SCHEMA = "builder.manifest/v1"
# Files beside the artifact's content that its content digest does not cover: the manifest itself.
OUTSIDE_DIGEST = frozenset({NAME})


def create(out: Path, lock: dict) -> dict:
    """Hash every file in out and write manifest.json; returns the manifest."""
    files = file_entries(out, exclude=OUTSIDE_DIGEST)
    manifest = {
        "schema": SCHEMA,
        "release": lock["release"],
        "version": lock["spec"]["release"]["version"],
        "artifact_id": lock["artifact_id"],
        "overrides": lock["overrides"],
        "spec_digest": sha256_bytes(canonical_json(lock["spec"])),
        "inputs": lock["inputs"],
        "determinism": determinism.settings(),
        "files": files,
        "content_digest": tree_digest(files),
    }
    (out / NAME).write_text(pretty_json(manifest), encoding="utf-8")
    return manifest


def read(artifact: Path) -> dict:
    return json.loads((artifact / NAME).read_text(encoding="utf-8"))
