"""manifest.json: what an artifact is (artifact_id, inputs) and what it holds (every file, digest).

Its content digest covers every file but the record files (manifest.json, provenance.json): those
describe the content; the manifest lists provenance.json's sha256 separately, so verify checks it too.
"""

from pathlib import Path

from builder import determinism
from builder.canonical import canonical_json, file_entry, pretty_json, sha256_bytes, tree_digest
from builder.paths import MANIFEST_FILE, PROVENANCE_FILE
from builder.release.release import Release

SCHEMA = "builder.manifest/v2"


def create(out: Path, release: Release, files: list) -> dict:
    """Write manifest.json into out; returns the manifest.

    files: the content files' entries ({path, sha256, size}; everything but RECORD_FILES), hashed once
    by the build and shared with provenance.json's subjects.
    """
    records = [file_entry(out, PROVENANCE_FILE)] if (out / PROVENANCE_FILE).is_file() else []
    manifest = {
        "schema": SCHEMA,
        "lock_schema": release.schema,
        "release": release.name,
        "version": release.spec.release.version,
        "artifact_id": release.artifact_id,
        "overrides": list(release.overrides),
        "spec_digest": sha256_bytes(canonical_json(release.spec.data())),
        "inputs": release.inputs,
        "determinism": determinism.settings(),
        "files": files,
        "records": records,
        "content_digest": tree_digest(files),
    }
    (out / MANIFEST_FILE).write_text(pretty_json(manifest), encoding="utf-8")
    return manifest
