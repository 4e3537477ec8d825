"""Quality of an artifact against its source model: perplexity and mean next-token KL divergence on
the evaluation text, on CPU through plain transformers loading (FP32); and the release's quality gate.
Tasks the eval group names run through lm-evaluation-harness beside it (builder/check/tasks.py).

    builder eval artifacts/smollm2-135m-instruct-fp8-static [--eval docstrings] [--out eval.json]
"""

import math
import sys
from collections.abc import Callable
from pathlib import Path

from builder.errors import BuilderError, CheckFailed, Problem

DIGITS = 6  # decimals kept in eval.json: far below run-to-run noise of any real comparison


def load_model(path: Path):
    """A causal LM in FP32, loaded as its format's module says (builder/formats/); a source checkpoint
    reads as dense."""
    from transformers.utils import logging

    from builder import formats
    from builder.quant import quantize

    if not sys.stderr.isatty():
        logging.disable_progress_bar()  # quiet in pipes and CI, like our own tqdm bars
    fmt, config = formats.found_in(path)
    return fmt.load(path, config, quantize.runtime_arithmetic(fmt.QUANTIZER).decode)


def measure(source: Path, artifact: Path, ids, device: str = "cpu") -> dict:
    """Perplexity of both models and the mean KL(source || artifact) per predicted token, window by window.

    Args:
        source: the source checkpoint folder.
        artifact: the (staged or built) artifact folder.
        ids: LongTensor [windows, length] of evaluation tokens.
        device: where both models run (cpu, cuda); each window's sums are taken in float64.
    """
    return measure_all(source, [artifact], ids, device)[0]


def measure_all(source: Path, artifacts: list, ids, device: str = "cpu") -> list:
    """measure() for several artifacts of one source, running the source once per window (benchmarks
    compare many artifacts on the same text); each artifact's figures are computed exactly as alone."""
    import torch
    from torch.nn.functional import log_softmax
    from builder.console import progress

    reference = load_model(source).to(device)
    candidates = [load_model(artifact).to(device) for artifact in artifacts]
    nll_source, tokens = 0.0, 0
    nll, kl = [0.0] * len(candidates), [0.0] * len(candidates)
    with torch.no_grad():
        for window in progress(ids.split(1), desc="eval", unit="window"):
            window = window.to(device)
            targets = window[0, 1:]
            expected = log_softmax(reference(window).logits[0, :-1].to(torch.float32), dim=-1)
            nll_source -= float(expected.gather(1, targets[:, None]).sum(dtype=torch.float64))
            for index, candidate in enumerate(candidates):
                actual = log_softmax(candidate(window).logits[0, :-1].to(torch.float32), dim=-1)
                nll[index] -= float(actual.gather(1, targets[:, None]).sum(dtype=torch.float64))
                kl[index] += float((expected.exp() * (expected - actual)).sum(dtype=torch.float64))
            tokens += targets.numel()
    source_perplexity = math.exp(nll_source / tokens)
    found = []
    for total, divergence in zip(nll, kl):
        perplexity = {"source": source_perplexity, "artifact": math.exp(total / tokens)}
        found.append({
            "windows": int(ids.shape[0]), "sequence_length": int(ids.shape[1]), "tokens": tokens,
            "perplexity": {name: round(value, DIGITS) for name, value in perplexity.items()},
            "perplexity_increase_pct": round(100 * (perplexity["artifact"] / perplexity["source"] - 1), DIGITS),
            "mean_kl": round(divergence / tokens, DIGITS),
        })
    return found


def gate_problems(result: dict, gate: dict, where=lambda path: "") -> list:
    """A Problem for every figure beyond the gate's limit, naming the figure, its value, the limit and
    where(key path), the file that set the limit (setter())."""
    found = []
    for figure, limit_key, unit in (("perplexity_increase_pct", "max_perplexity_increase_pct", " %"),
                                    ("mean_kl", "max_mean_kl", " nats")):
        limit = gate[limit_key]
        if limit is not None and result[figure] > limit:
            found.append(Problem(where(("eval", "gate", limit_key)), f"eval.gate.{limit_key}",
                                 f"{figure} {result[figure]}{unit} exceeds the gate's {limit}{unit} (perplexity "
                                 f"{result['perplexity']['artifact']} vs source {result['perplexity']['source']})"))
    return found


def setter(root: Path, spec: dict, overrides) -> Callable[[tuple], str]:
    """where(key path) -> the file that set that key of spec: an override, the release file (which
    sets most gates) or the eval group's file (builder/release/resolve.py locate())."""
    from builder.release.resolve import locate

    return lambda path: locate(root, spec["choices"], tuple(overrides), path, "").file


def evaluate(root: Path, spec: dict, source: Path, artifact: Path, log=print, ids=None) -> dict:
    """eval.json's content for an artifact of spec (which must name an eval dataset), with the gate verdict.

    ids: the eval windows when the caller has drawn them already (a build does, before writing).
    """
    from builder.source import data

    eval_file = f"specs/eval/{spec['choices']['eval']}.yaml"
    if ids is None:
        ids = data.samples(root, spec["eval"], source, file=eval_file, group="eval")
    result = measure(source, artifact, ids, spec["eval"].get("device", "cpu"))  # artifacts before devices: cpu
    broken = [figure for figure in ("perplexity_increase_pct", "mean_kl") if not math.isfinite(result[figure])]
    if broken:  # whatever the gate says: an artifact whose outputs are NaN or infinite is broken
        raise CheckFailed(Problem(str(artifact.name), "eval", f"{', '.join(broken)} not finite (perplexity "
                                  f"{result['perplexity']['artifact']}): the artifact's logits hold NaN or infinity"))
    problems = gate_problems(result, spec["eval"]["gate"])
    result["dataset"] = spec["eval"]["dataset"]
    result["gate"] = {**spec["eval"]["gate"], "passed": not problems}
    log(f"eval: perplexity {result['perplexity']['artifact']} (source {result['perplexity']['source']}, "
        f"{result['perplexity_increase_pct']:+.3f} %), mean KL {result['mean_kl']}")
    if spec["eval"].get("tasks"):  # absent from releases without tasks: their eval.json keeps its bytes
        from builder.check import tasks

        result["tasks"] = tasks.measure(root, spec, source, artifact, load_model, log)
    return result


def require_gate(result: dict, spec: dict, root: Path, overrides=()) -> None:
    """Raise CheckFailed (exit 1) naming each figure, and each task's recovery, that misses the release's
    gate, and the file that set the limit (spec built from the release with overrides)."""
    where = setter(root, spec, overrides)
    problems = gate_problems(result, spec["eval"]["gate"], where)
    if "tasks" in result:
        from builder.check import tasks

        problems += tasks.recovery_problems(result["tasks"]["results"], where(("eval", "tasks")))
    if problems:
        raise CheckFailed(problems)


def evaluate_artifact(root: Path, artifact: Path, spec: dict, overrides: list, option: str | None = None,
                      log=print) -> tuple:
    """(eval result, spec, its overrides) for a built artifact of spec (its recorded release.json, built
    with overrides): its release's eval group, or the eval option given (then one override more)."""
    from builder.source import load
    from builder.release.resolve import resolve

    if option is not None:
        overrides = (*overrides, f"eval={option}")
        spec = resolve(root, spec["release"]["name"], overrides)
    if spec["eval"]["dataset"] is None:
        raise BuilderError(Problem(f"specs/eval/{spec['choices']['eval']}.yaml", "eval.dataset",
                                   "null: the release measures nothing; pass --eval OPTION, e.g. --eval docstrings"))
    return evaluate(root, spec, load.source_dir(root, spec), artifact, log), spec, tuple(overrides)
