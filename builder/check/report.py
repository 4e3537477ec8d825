"""`builder report`: an HTML page (and PNGs) of a model's releases, size against quality, the Pareto front.

    builder report [RELEASE...] [--out reports]

Every figure comes from what built artifacts record (artifacts/<release>/manifest.json, release.json,
eval.json) and from specs/; a release without a built artifact is listed as "not built", with no numbers.
The page is self-contained (inline SVG and CSS, no script) and its bytes depend only on those inputs.
"""

from pathlib import Path

from builder import atomic
from builder.artifact import record
from builder.check import page, pareto, png
from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import EVAL_FILE
from builder.release import cache, lock, memory
from builder.release.resolve import list_releases, resolve, unknown_release

PAGE_FILE = "index.html"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")  # weight files: safetensors (shards, MLX) and GGUF
# The quality axes a plot can have, in the order shown: eval.json's key (or the row's, for recovery),
# words for people, the PNG's file name part, whether higher is better, whether a log axis fits.
METRICS = (
    {"key": "mean_kl", "short": "mean KL", "axis": "mean KL (nats/token)", "png": "kl", "higher": False,
     "log": True, "title": "Mean KL divergence from the source model against bits per weight"},
    {"key": "perplexity_increase_pct", "short": "perplexity increase", "axis": "perplexity increase (%)",
     "png": "perplexity", "higher": False, "log": False,
     "title": "Perplexity increase over the source model against bits per weight"},
    {"key": "task_recovery", "short": "task recovery", "axis": "task recovery", "png": "recovery", "higher": True,
     "log": False, "title": "Task recovery (artifact score / source score, mean over tasks) against bits per weight"},
)


def report(root: Path, releases: list, out: Path, log=print) -> dict:
    """Write out/index.html (and out/<model>-<metric>.png when matplotlib is installed).

    Returns {"files": written paths, "png": None or why PNGs were skipped}. Unknown releases are
    bad input: nothing is written.
    """
    known = list_releases(root)
    names = sorted(set(releases)) if releases else known
    unknown = [name for name in names if name not in known]
    if unknown:
        raise BuilderError([unknown_release(name, known) for name in unknown])
    rows, problems = [], []
    for name in names:
        try:
            rows.append(row(root, name))
        except CheckFailed:
            raise  # a damaged artifact's record files: exit 1, as `builder verify` says
        except BuilderError as error:  # a spec that does not resolve: said once, with every other
            problems += [Problem(f"specs/release/{name}.yaml", "", f"does not resolve: {problem}")
                         for problem in error.problems]
    if problems:
        raise BuilderError(problems)
    models = by_model(rows)
    files = {PAGE_FILE: page.render(models, METRICS).encode("utf-8")}
    pictures, skipped = png.render(models, METRICS)
    files.update(pictures)
    written = []
    for name, data in sorted(files.items()):
        with atomic.replacing(out / name) as temporary:
            temporary.write_bytes(data)
        written.append(out / name)
    if skipped:
        log(f"PNG skipped: {skipped}")
    return {"files": written, "png": skipped}


def row(root: Path, release: str) -> dict:
    """What the report says of one release: from its built artifact, or its resolved spec when there is
    none (then only the recipe, target and gate, and built False)."""
    folder = root / "artifacts" / release
    if not record.is_artifact(folder):
        spec = cache.resolved(root, release, (), lambda: resolve(root, release))
        return {**described(spec), "release": release, "built": False, "status": "not built"}
    recorded = record.read(folder)
    manifest, spec = recorded.manifest, recorded.spec
    weight_bytes = sum(entry["size"] for entry in manifest.get("files", [])
                       if entry["path"].endswith(WEIGHT_SUFFIXES))
    parameters = memory.parameters(spec["model"]["architecture"])["total"]
    evaluation = record.json_file(folder, EVAL_FILE) if (folder / EVAL_FILE).is_file() else None
    committed = lock.read(root, release)
    stale = committed is not None and committed.get("artifact_id") != manifest.get("artifact_id")
    return {**described(spec), **quality(evaluation), "release": release, "built": True,
            "status": "built; the committed lock names another artifact_id" if stale else "built",
            "overrides": list(manifest.get("overrides", [])), "artifact_id": manifest.get("artifact_id"),
            "content_digest": manifest.get("content_digest"), "weight_bytes": weight_bytes,
            "parameters": parameters, "bits_per_weight": 8 * weight_bytes / parameters}


def described(spec: dict) -> dict:
    """A release's recipe, format, target, version and quality gate, from its resolved spec."""
    choices, evaluation = spec["choices"], spec.get("eval", {})
    gate = (evaluation.get("gate") or {}) if evaluation.get("dataset") else {}
    limits = [f"{key} {value}" for key, value in sorted(gate.items()) if value is not None]
    return {"model": choices["model"], "model_id": spec["model"].get("id", ""), "recipe": choices["quant"],
            "format": spec["quant"]["format"], "target": choices["target"], "version": spec["release"]["version"],
            "gate": ", ".join(limits) if limits else "none"}


def quality(evaluation: dict | None) -> dict:
    """The figures eval.json records (absent ones stay absent: nothing is filled in)."""
    if evaluation is None:
        return {"evaluated": False}
    found = {"evaluated": True, "gate_passed": (evaluation.get("gate") or {}).get("passed")}
    for key in ("mean_kl", "perplexity_increase_pct"):
        if is_number(evaluation.get(key)):
            found[key] = evaluation[key]
    recovery = task_recovery(evaluation)
    if recovery is not None:
        found["task_recovery"] = recovery
    return found


def task_recovery(evaluation: dict) -> float | None:
    """The mean of the per-task recoveries eval.json records under tasks.<task>.recovery (artifact
    score / source score), or None when it records none."""
    tasks = evaluation.get("tasks")
    if not isinstance(tasks, dict):
        return None
    found = [task["recovery"] for _, task in sorted(tasks.items())
             if isinstance(task, dict) and is_number(task.get("recovery"))]
    return sum(found) / len(found) if found else None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def by_model(rows: list) -> list:
    """[{"model", "model_id", "rows", "points": {metric: [...]}}] sorted by model, rows by release;
    each built row gains "pareto": the metrics on whose front it lies."""
    models = {}
    for item in sorted(rows, key=lambda r: r["release"]):
        models.setdefault(item["model"], []).append(item)
    grouped = []
    for model, items in sorted(models.items()):
        points = {}
        for metric in METRICS:
            measured = [item for item in items if item["built"] and metric["key"] in item]
            flags = pareto.front([(item["bits_per_weight"], item[metric["key"]]) for item in measured],
                                 metric["higher"])
            points[metric["key"]] = [point(item, model, metric["key"], flag) for item, flag in zip(measured, flags)]
            for item, flag in zip(measured, flags):
                if flag:
                    item.setdefault("pareto", []).append(metric["short"])
        model_ids = sorted({item["model_id"] for item in items})
        grouped.append({"model": model, "model_id": ", ".join(model_ids), "rows": items, "points": points})
    return grouped


def point(item: dict, model: str, key: str, on_front: bool) -> dict:
    """A plotted point: the release, its short label (the model's name taken off), size and quality."""
    release = item["release"]
    short = release[len(model) + 1:] if release.startswith(f"{model}-") else release
    return {"release": release, "label": short, "x": item["bits_per_weight"], "y": item[key], "pareto": on_front}
