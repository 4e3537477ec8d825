"""What an artifact records about itself, read in one place: its manifest, resolved spec and provenance,
and the lock entry it was built from.

    recorded = record.read(Path("artifacts/smollm2-135m-instruct-fp8-dynamic"))
    recorded.release().artifact_id    # typed, to rebuild it; recorded.entry: the same as plain data
"""

import json
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import MANIFEST_FILE, PROVENANCE_FILE, RELEASE_FILE
from builder.release import validate
from builder.release.release import Release


@dataclass(frozen=True)
class Record:
    """An artifact's own account of itself."""

    path: Path
    manifest: dict
    spec: dict               # release.json
    provenance: dict | None  # provenance.json (None for artifacts built before it existed)

    @property
    def entry(self) -> dict:
        """The lock entry the artifact was built from, as recorded (release.json's spec + the manifest's
        inputs): plain data, so verify and audit hash and compare the recorded bytes whatever shape of
        spec the builder that wrote them had."""
        m = self.manifest
        return {"schema": m.get("lock_schema"), "release": m.get("release"), "overrides": m.get("overrides", []),
                "artifact_id": m.get("artifact_id"), "spec": self.spec, "inputs": m.get("inputs", {})}

    def release(self) -> Release:
        """The recorded lock entry as a Release, to build again; BuilderError naming every key of
        release.json that this builder's spec models do not accept (an artifact of another version)."""
        spec, problems = validate.typed(self.spec)
        if problems:
            where = f"{self.path.name}/{RELEASE_FILE}"
            raise BuilderError([Problem(where, ".".join(map(str, path)), f"{message} (this builder cannot "
                                        "build the recorded spec again)") for path, message in problems])
        m = self.manifest
        return Release(name=m.get("release"), overrides=tuple(m.get("overrides", [])), spec=spec,
                       inputs=m.get("inputs", {}), artifact_id=m.get("artifact_id"), schema=m.get("lock_schema"))


def is_artifact(path: Path) -> bool:
    """A complete artifact: the manifest is written last, so its presence means the rest is there."""
    return (path / MANIFEST_FILE).is_file()


def read(artifact: Path, strict: bool = True) -> Record:
    """The record of an artifact folder. BuilderError (exit 2) when it is no artifact. A record file
    that is missing or unreadable (a damaged artifact) is CheckFailed (exit 1), or, with
    strict=False, read as {} (None for provenance) so that a report can go on and say so."""
    if not is_artifact(artifact):
        raise BuilderError(Problem(str(artifact), "", f"not an artifact (no {MANIFEST_FILE})"))
    manifest, spec = json_file(artifact, MANIFEST_FILE, strict), json_file(artifact, RELEASE_FILE, strict)
    provenance = json_file(artifact, PROVENANCE_FILE, strict) if (artifact / PROVENANCE_FILE).is_file() else None
    return Record(artifact, manifest or {}, spec or {}, provenance)


def json_file(artifact: Path, name: str, strict: bool = True) -> dict | None:
    """One JSON object file of the artifact (None when unreadable and not strict)."""
    try:
        value = json.loads((artifact / name).read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        if not strict:
            return None
        raise CheckFailed(Problem(f"{artifact.name}/{name}", "", f"unreadable ({error})")) from None
    return value
