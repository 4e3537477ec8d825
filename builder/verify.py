"""Check that the bytes of an artifact on disk are those its manifest and provenance list.

    builder verify artifacts/smollm2-135m-instruct-fp8-dynamic
    builder verify --rebuild artifacts/smollm2-135m-instruct-fp8-dynamic
    builder verify --signature artifacts/smollm2-135m-instruct-fp8-dynamic.sig --key pub.pem artifacts/...
"""

import json
from pathlib import Path

from builder import identity, manifest, provenance
from builder.canonical import canonical_json, file_entries, sha256_bytes, tree_digest
from builder.errors import BuilderError, CheckFailed, Problem


def verify(artifact: Path) -> dict:
    """Re-hash every file; raise CheckFailed naming each missing, extra or changed file."""
    if not (artifact / manifest.NAME).is_file():
        raise BuilderError(Problem(str(artifact), "", f"not an artifact (no {manifest.NAME})"))
    try:
        recorded = manifest.read(artifact)
        listed = {entry["path"]: entry for entry in recorded["files"]}
        claimed = recorded["content_digest"]
    except (ValueError, KeyError, TypeError):
        raise CheckFailed(Problem(f"{artifact.name}/{manifest.NAME}", "", "unreadable manifest")) from None
    actual = {entry["path"]: entry for entry in file_entries(artifact, exclude=manifest.OUTSIDE_DIGEST)}
    problems = [Problem(f"{artifact.name}/{path}", "", "missing") for path in sorted(set(listed) - set(actual))]
    problems += [Problem(f"{artifact.name}/{path}", "", "extra file, not in the manifest")
                 for path in sorted(set(actual) - set(listed))]
    for path in sorted(set(listed) & set(actual)):
        if listed[path] != actual[path]:
            problems.append(Problem(f"{artifact.name}/{path}", "", f"changed: {actual[path]['sha256']} "
                                    f"({actual[path]['size']} bytes), manifest has "
                                    f"{listed[path]['sha256']} ({listed[path]['size']} bytes)"))
    if not problems and tree_digest(list(listed.values())) != claimed:
        problems.append(Problem(f"{artifact.name}/{manifest.NAME}", "content_digest",
                                "does not match the files it lists (manifest edited)"))
    if not problems:
        problems = consistency_problems(artifact, recorded, list(actual.values()))
    if problems:
        raise CheckFailed(problems)
    return {"artifact": artifact.name, "files": len(listed), "content_digest": claimed,
            "artifact_id": recorded["artifact_id"]}


def consistency_problems(artifact: Path, recorded: dict, actual: list) -> list:
    """The manifest's claims against the files its digest covers: provenance subjects, artifact_id.

    A manifest rewritten to match tampered files still disagrees with provenance.json (inside the
    digest), and an edited artifact_id or inputs no longer hash to the artifact_id of release.json.
    """
    where = artifact.name
    if not (artifact / provenance.NAME).is_file():  # artifacts built before provenance existed
        return []
    try:
        document = provenance.read(artifact)
        spec = json.loads((artifact / "release.json").read_text(encoding="utf-8"))
        recorded_id = document["predicate"]["buildDefinition"]["internalParameters"]["artifact_id"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [Problem(f"{where}/{provenance.NAME}", "", f"unreadable ({error})")]
    others = [e for e in actual if e["path"] != provenance.NAME]
    problems = provenance.subject_problems(document, others, where)
    if recorded_id != recorded.get("artifact_id"):
        problems.append(Problem(f"{where}/{manifest.NAME}", "artifact_id", f"{recorded.get('artifact_id')} "
                                f"differs from provenance.json's {recorded_id}"))
    if identity.artifact_id(spec, recorded.get("inputs")) != recorded_id:
        problems.append(Problem(f"{where}/{manifest.NAME}", "inputs", "release.json and the manifest's "
                                f"inputs do not hash to the artifact_id {recorded_id}"))
    if sha256_bytes(canonical_json(spec)) != recorded.get("spec_digest"):
        problems.append(Problem(f"{where}/{manifest.NAME}", "spec_digest", "differs from release.json's digest"))
    return problems
