"""Check that the bytes of an artifact on disk are those its manifest lists.

    builder verify artifacts/smollm2-135m-instruct-fp8-dynamic
"""

from pathlib import Path

from builder import manifest
from builder.canonical import file_entries, tree_digest
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
    if problems:
        raise CheckFailed(problems)
    return {"artifact": artifact.name, "files": len(listed), "content_digest": claimed,
            "artifact_id": recorded["artifact_id"]}
