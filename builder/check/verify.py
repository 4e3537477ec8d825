"""Check that the bytes of an artifact on disk are those its manifest and provenance list.

    builder verify artifacts/smollm2-135m-instruct-fp8-dynamic
    builder verify --rebuild artifacts/smollm2-135m-instruct-fp8-dynamic
    builder verify --signature artifacts/smollm2-135m-instruct-fp8-dynamic.sig --key pub.pem artifacts/...
"""

from pathlib import Path

from builder.artifact import provenance, record
from builder.canonical import canonical_json, file_entries, sha256_bytes, tree_digest
from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import MANIFEST_FILE, PROVENANCE_FILE, RECORD_FILES
from builder.release import identity


def verify(artifact: Path) -> dict:
    """Re-hash every file; raise CheckFailed naming each missing, extra or changed file."""
    if not record.is_artifact(artifact):
        raise BuilderError(Problem(str(artifact), "", f"not an artifact (no {MANIFEST_FILE})"))
    manifest = record.json_file(artifact, MANIFEST_FILE)  # release.json is read once the files hold
    try:
        content = {entry["path"]: entry for entry in manifest["files"]}
        listed = {**content, **{entry["path"]: entry for entry in manifest.get("records", [])}}
        claimed = manifest["content_digest"]
    except (KeyError, TypeError):
        raise CheckFailed(Problem(f"{artifact.name}/{MANIFEST_FILE}", "", "unreadable manifest")) from None
    actual = {entry["path"]: entry for entry in file_entries(artifact, exclude=frozenset({MANIFEST_FILE}))}
    problems = [Problem(f"{artifact.name}/{path}", "", "missing") for path in sorted(set(listed) - set(actual))]
    problems += [Problem(f"{artifact.name}/{path}", "", "extra file, not in the manifest")
                 for path in sorted(set(actual) - set(listed))]
    for path in sorted(set(listed) & set(actual)):
        if listed[path] != actual[path]:
            problems.append(Problem(f"{artifact.name}/{path}", "", f"changed: {actual[path]['sha256']} "
                                    f"({actual[path]['size']} bytes), manifest has "
                                    f"{listed[path]['sha256']} ({listed[path]['size']} bytes)"))
    if not problems and tree_digest(list(content.values())) != claimed:
        problems.append(Problem(f"{artifact.name}/{MANIFEST_FILE}", "content_digest",
                                "does not match the files it lists (manifest edited)"))
    if not problems:
        problems = consistency_problems(record.read(artifact), list(content.values()))
    if problems:
        raise CheckFailed(problems)
    return {"artifact": artifact.name, "files": len(listed), "content_digest": claimed,
            "artifact_id": manifest.get("artifact_id")}


def consistency_problems(recorded: record.Record, content: list) -> list:
    """The manifest's claims against the files it covers: provenance subjects, artifact_id.

    A manifest rewritten to match tampered files still disagrees with provenance.json, and an edited
    artifact_id or inputs no longer hash to the artifact_id of release.json.
    """
    where, manifest = recorded.path.name, recorded.manifest
    if recorded.provenance is None:  # artifacts built before provenance existed
        return []
    try:
        recorded_id = recorded.provenance["predicate"]["buildDefinition"]["internalParameters"]["artifact_id"]
    except (KeyError, TypeError) as error:
        return [Problem(f"{where}/{PROVENANCE_FILE}", "", f"unreadable ({error})")]
    problems = provenance.subject_problems(recorded.provenance, content, where)
    if recorded_id != manifest.get("artifact_id"):
        problems.append(Problem(f"{where}/{MANIFEST_FILE}", "artifact_id", f"{manifest.get('artifact_id')} "
                                f"differs from provenance.json's {recorded_id}"))
    if not identity.holds(recorded.entry):
        problems.append(Problem(f"{where}/{MANIFEST_FILE}", "inputs", "release.json and the manifest's "
                                f"inputs do not hash to the artifact_id {recorded_id}"))
    if sha256_bytes(canonical_json(recorded.spec)) != manifest.get("spec_digest"):
        problems.append(Problem(f"{where}/{MANIFEST_FILE}", "spec_digest", "differs from release.json's digest"))
    return problems


def content_files(artifact: Path) -> list:
    """The artifact's content files as they are on disk (what the content digest covers)."""
    return file_entries(artifact, exclude=RECORD_FILES)
