"""Write locks/<release>.json and params.yaml from specs/, or check that they are current.

    builder lock            # after editing specs/
    builder lock --check    # in CI: exit 1 when locks/ or params.yaml are stale
"""

import json
from pathlib import Path

import yaml

from builder import identity, memo
from builder.canonical import pretty_json
from builder.errors import BuilderError, CheckFailed, Problem
from builder.resolve import list_releases, resolve

LOCK_SCHEMA = "builder.lock/v1"
PARAMS_HEADER = """\
# Written by `builder lock` from specs/; do not edit. dvc.yaml runs one import stage per model below
# and one build stage per release. A release's calibration/eval slot names its data file, or its own
# lock when it has none (a DVC dependency list cannot vary in length; a repeated path is harmless).
"""
DATA_GROUPS = ("calibration", "eval")


def lock_entry(root: Path, release: str, overrides: tuple = ()) -> dict:
    """The lock of one release: resolved spec, inputs with digests, artifact_id."""
    spec = memo.resolved(root, release, tuple(overrides), lambda: resolve(root, release, tuple(overrides)))
    build_inputs = identity.inputs(root, spec)
    return {"schema": LOCK_SCHEMA, "release": release, "overrides": list(overrides),
            "artifact_id": identity.artifact_id(spec, build_inputs),
            "spec": spec, "inputs": build_inputs}


def all_entries(root: Path) -> dict:
    """release -> lock entry for every release in specs/. Raises with all releases' problems."""
    entries, problems = {}, []
    for release in list_releases(root):
        try:
            entries[release] = lock_entry(root, release)
        except BuilderError as error:
            problems.extend(error.problems)
    if problems:
        raise BuilderError(problems)
    return entries


def expected_files(root: Path) -> dict:
    """Every file `builder lock` owns, relative path -> text."""
    entries = all_entries(root)
    files = {f"locks/{name}.json": pretty_json(entry) for name, entry in entries.items()}
    files["params.yaml"] = PARAMS_HEADER + yaml.safe_dump(params(entries), sort_keys=True)
    return files


def params(entries: dict) -> dict:
    """What dvc.yaml's foreach loops need: models to import, and per release its dependency paths."""
    releases, models = {}, {}
    for name, entry in entries.items():
        spec, own_lock = entry["spec"], f"locks/{name}.json"
        releases[name] = {"lock": own_lock, "weights": spec["model"]["path"],
                          **{group: spec[group]["dataset"] or own_lock for group in DATA_GROUPS}}
        if spec["model"]["source"]["kind"] != "local":  # local checkpoints are `dvc add`-ed by hand
            models[spec["choices"]["model"]] = {key: spec["model"][key] for key in ("path", "digest", "source")}
    return {"models": models, "releases": releases}


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
    """Raise CheckFailed naming every stale, missing or orphaned lock file and its release."""
    files = expected_files(root)
    out_of_date = stale(root, files)
    if out_of_date:
        releases = sorted(Path(p).stem for p in out_of_date if p.startswith("locks/"))
        problems = [Problem(relative, "", f"stale: {why_stale(root, relative, files)}")
                    for relative in out_of_date]
        summary = Problem("locks/", "", f"stale releases: {', '.join(releases) or 'none'}; "
                          "run `builder lock` and commit locks/ and params.yaml")
        raise CheckFailed([*problems, summary])


def why_stale(root: Path, relative: str, files: dict) -> str:
    """One phrase: which release and what about it no longer matches specs/."""
    if relative == "params.yaml":
        return "does not match the releases in specs/"
    release = Path(relative).stem
    if relative not in files:
        return f"release {release} no longer exists in specs/release/"
    if not (root / relative).is_file():
        return f"release {release} is new and has no lock"
    try:
        old, new = json.loads((root / relative).read_text(encoding="utf-8")), json.loads(files[relative])
    except ValueError:
        return f"release {release}: unreadable lock"
    parts = [key for key in ("spec", "overrides") if old.get(key) != new[key]]
    parts += [f"inputs.{key}" for key in sorted(new["inputs"]) if old.get("inputs", {}).get(key) != new["inputs"][key]]
    return f"release {release} changed ({', '.join(parts) or 'format'})"


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
