"""Task accuracy of an artifact against its source through lm-evaluation-harness (the `tasks` extra), and
each task's recovery gate. Both models load as evaluation loads them (builder/formats/, FP32 on CPU) and
run the same lm-eval tasks with the same settings; eval.json's "tasks" records both scores, the recovery
and what measured them (harness, runtime, device, dtype).

    builder build smollm2-135m-instruct-fp8-dynamic-capitals     # eval group docstrings-capitals

recovery = artifact score / source score for a higher-is-better metric (source / artifact for a lower-is-
better one, so above 1 is always better). A source score of 0 leaves recovery undefined (null): a task that
gates on it fails, since the source cannot be recovered against.
"""

import logging
import tempfile
from pathlib import Path

from builder.errors import BuilderError, Problem

DIGITS = 6  # decimals kept in eval.json, as for perplexity and KL
LOGGERS = ("lm_eval", "lm-eval", "datasets", "evaluate")  # chatty at INFO: each task's loading and every batch


def config_of(root: Path, task: dict, file: str) -> dict | str:
    """What lm-eval loads for a task: its local config (a dict whose data_files are made absolute, so the
    working directory does not matter), or its name for lm-eval's own task."""
    if task["config"] is None:
        return task["name"]
    import yaml

    from builder.paths import inside
    from builder.release.identity import task_data_files

    path = inside(root, task["config"], file=file, key="eval.tasks.config")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("task") != task["name"]:
        raise BuilderError(Problem(file, "eval.tasks.name", f"{task['name']!r}: {task['config']} defines task "
                                   f"{config.get('task') if isinstance(config, dict) else None!r}"))
    files = {name: str(path.parent / relative) for name, relative in task_data_files(config).items()}
    return {**config, "dataset_kwargs": {**config.get("dataset_kwargs", {}), "data_files": files}}


def scores(model, tokenizer, tasks: list, configs: list, device: str) -> dict:
    """task name -> {metric: value, "higher_is_better": {...}, "samples": n} for one loaded model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="builder-tasks-") as cache:
        # the JSON dataset builder caches under the home folder unless told: a build writes nothing outside
        local = [{**config, "dataset_kwargs": {**config["dataset_kwargs"], "cache_dir": cache}}
                 if isinstance(config, dict) else config for config in configs]
        manager = TaskManager(include_defaults=any(isinstance(config, str) for config in local))
        found = {}
        for task, config in zip(tasks, local):  # one call per task: each its own num_fewshot and limit
            output = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device=device),
                tasks=[config], num_fewshot=task["num_fewshot"], limit=task.get("limit"), task_manager=manager,
                bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=1234,
                torch_random_seed=1234, fewshot_random_seed=1234)
            found[task["name"]] = {**output["results"][task["name"]],
                                   "higher_is_better": output["higher_is_better"][task["name"]],
                                   "samples": output["n-samples"][task["name"]]["effective"]}
    return found


def metric(result: dict, task: dict, file: str) -> float:
    """The gated metric's value (lm-eval names it "<metric>,<filter>", e.g. "acc,none")."""
    values = {key.split(",")[0]: value for key, value in result.items() if "," in key and "_stderr" not in key}
    if task["metric"] not in values:
        raise BuilderError(Problem(file, "eval.tasks.metric", f"{task['metric']!r}: task {task['name']} reports "
                                   f"{', '.join(sorted(values))}"))
    return float(values[task["metric"]])


def recovery(source: float, artifact: float, higher_is_better: bool) -> float | None:
    """artifact relative to source, above 1 when the artifact is better; None when the source scores 0."""
    if higher_is_better:
        return None if source == 0 else artifact / source
    return None if artifact == 0 else source / artifact


def compare(tasks: list, source: dict, artifact: dict, file: str) -> list:
    """eval.json's rows, one per task, with each gate's verdict."""
    rows = []
    for task in tasks:
        name = task["name"]
        better = bool(source[name]["higher_is_better"].get(task["metric"], True))
        pair = {"source": metric(source[name], task, file), "artifact": metric(artifact[name], task, file)}
        ratio = recovery(pair["source"], pair["artifact"], better)
        limit = task["min_recovery"]
        rows.append({
            "task": name, "config": task["config"], "metric": task["metric"], "higher_is_better": better,
            "num_fewshot": task["num_fewshot"], "samples": source[name]["samples"],
            "score": {key: round(value, DIGITS) for key, value in pair.items()},
            "recovery": None if ratio is None else round(ratio, DIGITS),
            "min_recovery": limit,
            "passed": limit is None or (ratio is not None and ratio >= limit),
        })
    return rows


def recovery_problems(rows: list, file: str) -> list:
    """A Problem for every task whose recovery misses its gate, naming both scores."""
    found = []
    for index, row in enumerate(rows):
        if row["passed"]:
            continue
        why = ("undefined: the source scores 0" if row["recovery"] is None
               else f"{row['recovery']} is below the gate's {row['min_recovery']}")
        found.append(Problem(file, f"eval.tasks[{index}].min_recovery", f"{row['task']} {row['metric']} recovery "
                             f"{why} (artifact {row['score']['artifact']} vs source {row['score']['source']})"))
    return found


def load_tokenizer(folder: Path, fmt):
    """The folder's tokenizer as its runtime reads it (as the smoke check does; smoke.py imports evaluate.py,
    which calls this module): a GGUF file's own vocabulary, else the tokenizer files beside the weights."""
    from transformers import AutoTokenizer

    from builder import formats

    extra = {}
    if fmt.CONTAINER != formats.SAFETENSORS:
        extra["gguf_file"] = sorted(folder.glob(f"*{fmt.CONTAINER}"))[0].name
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **extra)


def stack(model, device: str) -> dict:
    """What measured the scores: harness and runtime with their versions, device and dtype."""
    from importlib import metadata

    return {"harness": f"lm-eval {metadata.version('lm-eval')}",
            "runtime": f"transformers {metadata.version('transformers')} (the format's evaluation loader)",
            "device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def measure(root: Path, spec: dict, source: Path, artifact: Path, load_model, log=print) -> dict:
    """eval.json's "tasks" part: both models over every task of spec's eval group, gated per task.

    load_model: path -> FP32 model, as evaluation loads each format (builder/check/evaluate.py).
    """
    from builder import formats

    file = f"specs/eval/{spec['choices']['eval']}.yaml"
    tasks, device = spec["eval"]["tasks"], spec["eval"].get("device", "cpu")
    configs = [config_of(root, task, file) for task in tasks]
    found, used = {}, None
    for role, folder in (("source", source), ("artifact", artifact)):
        fmt, _ = formats.found_in(folder)
        model = load_model(folder).to(device)
        tokenizer = load_tokenizer(folder, fmt)
        found[role] = scores(model, tokenizer, tasks, configs, device)
        used = stack(model, device)
        del model
    rows = compare(tasks, found["source"], found["artifact"], file)
    for row in rows:
        log(f"tasks: {row['task']} {row['metric']} {row['score']['artifact']} (source {row['score']['source']}), "
            f"recovery {row['recovery']}{'' if row['passed'] else ' (below the gate)'}")
    return {"measured_with": used, "results": rows, "passed": all(row["passed"] for row in rows)}
