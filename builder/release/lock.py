"""Write locks/<release>.json and params.yaml from specs/, check that they are current, and say how two
lock entries differ (the one comparison build, lock, rebuild, audit and plan use).

    builder lock            # after editing specs/
    builder lock --check    # in CI: exit 1 when locks/ or params.yaml are stale
"""

import json
from pathlib import Path

import yaml

from builder import atomic
from builder.canonical import pretty_json
from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import inside
from builder.release import cache, identity
from builder.release.models import Spec
from builder.release.release import LOCK_SCHEMA, Release
from builder.release.resolve import list_releases, resolve
PARAMS_HEADER = """\
# Written by `builder lock` from specs/; do not edit. dvc.yaml runs one import stage per model below
# and one build stage per release. A release's calibration/eval slot names its data file, or its own
# lock when it has none (a DVC dependency list cannot vary in length; a repeated path is harmless).
"""
DATA_GROUPS = ("calibration", "eval")
# The parts of a lock entry that decide its artifact_id, in the order differences() reports them.
COMPARED = ("spec", "overrides", *(f"inputs.{key}" for key in identity.INPUT_KEYS))


def locked(root: Path, release: str, overrides: tuple = ()) -> Release:
    """One release resolved and locked: typed spec, inputs with digests, artifact_id. BuilderError
    lists every problem of the spec (file, key, what is allowed)."""
    spec = cache.resolved(root, release, tuple(overrides), lambda: resolve(root, release, tuple(overrides)))
    check_weights_digest(root, spec)
    build_inputs = identity.inputs(root, spec)
    return Release(name=release, overrides=tuple(overrides), spec=Spec.of(spec), inputs=build_inputs,
                   artifact_id=identity.artifact_id(spec, build_inputs))


def lock_entry(root: Path, release: str, overrides: tuple = ()) -> dict:
    """locked(...).to_entry(): the lock of one release as plain data (what locks/<release>.json holds)."""
    return locked(root, release, tuple(overrides)).to_entry()


def check_weights_digest(root: Path, spec: dict) -> None:
    """Refuse a pinned weights digest that is not the digest of the weights folder, when it is here
    (a placeholder, or weights replaced without updating the spec); a checkout without weights (CI)
    cannot tell, and a build checks again."""
    model = spec["choices"]["model"]
    folder = inside(root, spec["model"]["path"], file=f"specs/model/{model}.yaml", key="model.path")
    if not folder.is_dir():
        return
    actual = cache.folder_digest(folder)
    if actual != spec["model"]["digest"]:
        raise BuilderError(Problem(f"specs/model/{model}.yaml", "model.digest", f"{spec['model']['digest']} is not "
                                   f"the digest of {spec['model']['path']} ({actual}): refusing weights that are "
                                   "not the pinned ones; if these are right, pin their digest "
                                   f"(builder model add {model} {spec['model']['path']} --force writes it)"))


def differences(old: dict | None, new: dict) -> list:
    """[(part, old value, new value)] for every part of COMPARED that differs between two lock
    entries (a committed lock, an artifact's recorded entry, a fresh resolve); [] when they agree."""
    if old is None:
        return [("lock", None, new.get("artifact_id"))]

    def part(entry, name):
        section, _, key = name.partition(".")
        value = entry.get(section)
        return value.get(key) if key and isinstance(value, dict) else value

    found = [(name, part(old, name), part(new, name)) for name in COMPARED if part(old, name) != part(new, name)]
    if not found and old.get("artifact_id") != new.get("artifact_id"):
        found.append(("artifact_id", old.get("artifact_id"), new.get("artifact_id")))
    return found


def describe(found: list) -> str:
    """differences() in a phrase: the parts that differ, versions and toolchain shown old -> new."""
    words = []
    for name, old, new in found:
        if name in ("inputs.versions", "inputs.toolchain") and isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new))
                       if old.get(key) != new.get(key)]
            words.append(f"{name} ({', '.join(changed)})")
        else:
            words.append(name)
    return ", ".join(words)


def all_releases(root: Path) -> dict:
    """name -> Release for every release in specs/. Raises with all releases' problems."""
    releases, problems = {}, []
    for name in list_releases(root):
        try:
            releases[name] = locked(root, name)
        except BuilderError as error:
            problems.extend(error.problems)
    if problems:
        raise BuilderError(problems)
    return releases


def expected_files(root: Path) -> dict:
    """Every file `builder lock` owns, relative path -> text."""
    releases = all_releases(root)
    files = {release.lock_file: pretty_json(release.to_entry()) for release in releases.values()}
    files["params.yaml"] = PARAMS_HEADER + yaml.safe_dump(params(releases), sort_keys=True)
    return files


def params(releases: dict) -> dict:
    """What dvc.yaml's foreach loops need: models to import (with what their import depends on),
    and per release its dependency paths. releases: name -> Release."""
    found, models = {}, {}
    for name, release in releases.items():
        model, own_lock = release.spec.model, release.lock_file
        found[name] = {"lock": own_lock, "weights": model.path,
                       **{group: release.data_files.get(group, own_lock) for group in DATA_GROUPS}}
        if model.source.kind != "local":  # local checkpoints are `dvc add`-ed by hand
            models[release.spec.choices.model] = {"path": model.path, "digest": model.digest,
                                                  "source": model.source.data(),
                                                  **identity.import_inputs(model.source.kind)}
    return {"models": models, "releases": found}


def write(root: Path) -> list:
    """Bring locks/ and params.yaml up to date; returns the paths that changed."""
    files = expected_files(root)
    changed = []
    for relative in stale(root, files):
        path = root / relative
        if relative in files:
            atomic.write_text(path, files[relative])
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
        old = json.loads((root / relative).read_text(encoding="utf-8"))
    except ValueError:
        return f"release {release}: unreadable lock"
    return f"release {release} changed ({describe(differences(old, json.loads(files[relative]))) or 'format'})"


def stale(root: Path, files: dict) -> list:
    """Paths whose content differs from files, plus lock files of releases that no longer exist."""
    existing = {f"locks/{p.name}" for p in (root / "locks").glob("*.json")}
    differing = [rel for rel, text in files.items()
                 if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text]
    return sorted(set(differing) | (existing - set(files)))


def read(root: Path, release: str) -> dict | None:
    """The committed lock of a release, or None when there is none."""
    path = root / "locks" / f"{release}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def committed(root: Path, release: str) -> Release | None:
    """read(), typed."""
    entry = read(root, release)
    return None if entry is None else Release.from_entry(entry)
