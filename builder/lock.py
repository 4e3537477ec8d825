"""Write locks/<release>.json and params.yaml from specs/, or check that they are current.

    builder lock            # after editing specs/
    builder lock --check    # in CI: exit 1 when locks/ or params.yaml are stale
"""

from pathlib import Path

import yaml

from builder import identity
from builder.canonical import pretty_json
from builder.errors import BuilderError, CheckFailed, Problem
from builder.resolve import list_releases, resolve

LOCK_SCHEMA = "builder.lock/v1"
PARAMS_HEADER = "# Written by `builder lock` from specs/; do not edit. dvc.yaml builds one stage per release.\n"


def lock_entry(root: Path, release: str, overrides: tuple = ()) -> dict:
    """The lock of one release: resolved spec, inputs with digests, artifact_id."""
    spec = resolve(root, release, overrides)
    build_inputs = identity.inputs(root, spec)
    return {"schema": LOCK_SCHEMA, "release": release, "overrides": list(overrides),
            "artifact_id": identity.artifact_id(spec, build_inputs),
            "spec": spec, "inputs": build_inputs}


def expected_files(root: Path) -> dict:
    """Every file `builder lock` owns, relative path -> text. Raises with all releases' problems."""
    entries, problems = {}, []
    for release in list_releases(root):
        try:
            entries[release] = lock_entry(root, release)
        except BuilderError as error:
            problems.extend(error.problems)
    if problems:
        raise BuilderError(problems)
    files = {f"locks/{name}.json": pretty_json(entry) for name, entry in entries.items()}
    files["params.yaml"] = PARAMS_HEADER + yaml.safe_dump({"releases": params(entries)}, sort_keys=True)
    return files


def params(entries: dict) -> dict:
    """What dvc.yaml's foreach needs per release: its lock, weights and data paths."""
    return {name: {"lock": f"locks/{name}.json", "weights": entry["spec"]["model"]["path"],
                   "data": sorted(entry["inputs"]["data"])}
            for name, entry in entries.items()}


def write(root: Path) -> list:
    """Bring locks/ and params.yaml up to date; returns the paths that changed."""
    files = expected_files(root)
    changed = []
    for relative in stale(root, files):
        path = root / relative
        if relative in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            try:
                temporary.write_text(files[relative], encoding="utf-8")
                temporary.replace(path)
            finally:
                temporary.unlink(missing_ok=True)
        else:
            path.unlink()
        changed.append(relative)
    return changed


def check(root: Path) -> None:
    """Raise CheckFailed naming every stale, missing or orphaned lock file."""
    files = expected_files(root)
    out_of_date = stale(root, files)
    if out_of_date:
        raise CheckFailed([Problem(relative, "", "stale: run `builder lock` and commit the result")
                           for relative in out_of_date])


def stale(root: Path, files: dict) -> list:
    """Paths whose content differs from files, plus lock files of releases that no longer exist."""
    existing = {f"locks/{p.name}" for p in (root / "locks").glob("*.json")}
    differing = [rel for rel, text in files.items()
                 if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text]
    return sorted(set(differing) | (existing - set(files)))


def read(root: Path, release: str) -> dict | None:
    """The committed lock of a release, or None when there is none."""
    import json

    path = root / "locks" / f"{release}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
