"""What a branch changes, release by release, against a git revision: Markdown for a PR comment.

    builder plan                  # against the merge base with main
    builder plan --base v1.2 --json
"""

import json
import subprocess
from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.release import lock

MAIN_BRANCHES = ("main", "origin/main", "master", "origin/master")
ABSENT = object()


def git(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def base_commit(root: Path, base: str | None) -> tuple:
    """(label, commit) of the revision to compare with: base, or the merge base with the main branch."""
    if git(root, "rev-parse", "--git-dir").returncode:
        raise BuilderError(Problem(str(root), "--base", "not a git repository; `builder plan` compares "
                                   "the working tree with a git revision"))
    if base is None:
        branch = next((b for b in MAIN_BRANCHES if not git(root, "rev-parse", "-q", "--verify",
                                                            f"{b}^{{commit}}").returncode), None)
        if branch is None:
            raise BuilderError(Problem("--base", "", f"no main branch ({', '.join(MAIN_BRANCHES)}); "
                                       "name the revision to compare with: --base GIT_REV"))
        merge_base = git(root, "merge-base", "HEAD", branch)
        if merge_base.returncode:
            raise BuilderError(Problem("--base", "", f"HEAD and {branch} have no common ancestor; "
                                       "pass --base GIT_REV"))
        return f"merge base with {branch}", merge_base.stdout.strip()
    found = git(root, "rev-parse", "-q", "--verify", f"{base}^{{commit}}")
    if found.returncode:
        raise BuilderError(Problem("--base", "", f"{base!r} is not a commit in this repository "
                                   "(a branch, tag or commit id, e.g. main or HEAD~1)"))
    return base, found.stdout.strip()


def old_locks(root: Path, commit: str) -> dict:
    """release -> lock entry as committed at commit (the locks are the resolved specs): plain data,
    since a lock of another revision may have a shape today's Release does not read."""
    listing = git(root, "ls-tree", "--name-only", f"{commit}:locks")
    names = [n for n in listing.stdout.split() if n.endswith(".json")] if not listing.returncode else []
    return {Path(name).stem: json.loads(git(root, "show", f"{commit}:locks/{name}").stdout) for name in names}


def flatten(value, prefix: str = "") -> dict:
    """Dotted key -> leaf value; lists are leaves (they change as a whole)."""
    if isinstance(value, dict) and value:
        flat = {}
        for key in sorted(value):
            flat.update(flatten(value[key], f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def key_diff(old: dict, new: dict) -> list:
    """[{key, old, new}] for every dotted key whose value differs; a side lacking the key has no entry."""
    before, after = flatten(old), flatten(new)
    diff = []
    for key in sorted(set(before) | set(after)):
        if before.get(key, ABSENT) != after.get(key, ABSENT):
            sides = {side: values[key] for side, values in (("old", before), ("new", after)) if key in values}
            diff.append({"key": key, **sides})
    return diff


def compare(old: dict, new: dict) -> dict:
    """Added, removed, changed (artifact_id differs) and unchanged releases.

    old: release -> lock entry (plain data, old_locks); new: release -> Release (lock.all_releases)."""
    changed = []
    for name in sorted(set(old) & set(new)):
        release = new[name]
        if old[name].get("artifact_id") == release.artifact_id:
            continue
        old_inputs = old[name].get("inputs", {})
        inputs = [found for found in lock.differences(old[name], release.to_entry()) if found[0].startswith("inputs.")]
        changed.append({
            "release": name,
            "artifact_id": {"old": old[name].get("artifact_id"), "new": release.artifact_id},
            "spec": key_diff(old[name].get("spec", {}), release.spec.data()),
            "inputs": [found[0].split(".", 1)[1] for found in inputs],
            "inputs_detail": lock.describe(inputs),
            "weights": {"old": old_inputs.get("weights", {}).get("digest"),
                        "new": release.inputs["weights"]["digest"]},
        })
    return {
        "added": [{"release": n, "artifact_id": new[n].artifact_id} for n in sorted(set(new) - set(old))],
        "removed": [{"release": n, "artifact_id": old[n].get("artifact_id")} for n in sorted(set(old) - set(new))],
        "changed": changed,
        "unchanged": sorted(n for n in set(old) & set(new) if n not in {c["release"] for c in changed}),
    }


def plan(root: Path, base: str | None = None) -> dict:
    """The plan of the working tree's specs/ against base (default: merge base with main)."""
    label, commit = base_commit(root, base)
    new = lock.all_releases(root)
    return {"base": label, "commit": commit, **compare(old_locks(root, commit), new)}


def shown(diff: dict, side: str) -> str:
    """A value for a Markdown table cell: JSON in backticks, pipes escaped."""
    if side not in diff:
        return "(absent)"
    return "`" + json.dumps(diff[side], sort_keys=True).replace("|", "\\|") + "`"


def markdown(report: dict) -> str:
    """The plan as Markdown for a pull-request comment."""
    counts = {key: len(report[key]) for key in ("added", "removed", "changed", "unchanged")}
    lines = [f"## Release plan against {report['base']} (`{report['commit'][:12]}`)", "",
             ", ".join(f"{count} {key}" for key, count in counts.items()) + "."]
    if report["added"]:
        lines += ["", "### Added", ""] + [f"- `{a['release']}`: artifact_id `{a['artifact_id']}`"
                                          for a in report["added"]]
    if report["removed"]:
        lines += ["", "### Removed", ""] + [f"- `{r['release']}`: was `{r['artifact_id']}`"
                                            for r in report["removed"]]
    for change in report["changed"]:
        weights = change["weights"]
        lines += ["", f"### Changed: `{change['release']}`", "",
                  f"- artifact_id: `{change['artifact_id']['old']}` -> `{change['artifact_id']['new']}`",
                  "- source weights: " + ("unchanged" if weights["old"] == weights["new"] else
                                          f"changed, `{weights['old']}` -> `{weights['new']}`")]
        if change["inputs"]:
            lines.append(f"- inputs changed: {change['inputs_detail']}")
        if change["spec"]:
            lines += ["", "| key | old | new |", "|---|---|---|"]
            lines += [f"| `{d['key']}` | {shown(d, 'old')} | {shown(d, 'new')} |" for d in change["spec"]]
    return "\n".join(lines) + "\n"
