"""Quality of an artifact against its source model: perplexity and mean next-token KL divergence on
the evaluation text, on CPU through plain transformers loading (FP32); and the release's quality gate.

    builder eval artifacts/smollm2-135m-instruct-fp8-static [--eval docstrings] [--out eval.json]
"""

import json
import math
import sys
from pathlib import Path

from builder.errors import BuilderError, CheckFailed, Problem

DIGITS = 6  # decimals kept in eval.json: far below run-to-run noise of any real comparison


def load_model(path: Path):
    """A causal LM in FP32; compressed-tensors checkpoints are dequantized (activations still
    fake-quantized), GGUF files read by transformers' GGUF loader, MLX checkpoints dequantized."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if not sys.stderr.isatty():
        logging.disable_progress_bar()  # quiet in pipes and CI, like our own tqdm bars
    gguf_files = sorted(path.glob("*.gguf"))
    if gguf_files:  # the weights dequantized by gguf's own decoders, the config read from the file's keys
        return AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_files[0].name, dtype=torch.float32,
                                                    trust_remote_code=False).eval()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization", {}).get("mode") == "affine":
        return load_mlx(path, config)
    kwargs = {}
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False, **kwargs).eval()


def load_mlx(path: Path, config: dict):
    """An mlx-lm checkpoint as a transformers model in FP32: each quantized Linear's weight is
    scale * q + bias (exact in FP32), every other tensor cast; read one tensor at a time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from builder.quant import affine
    from builder.source.load import tensor_index
    from builder.tensorfile import reader

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    for key in ("quantization", "quantization_config"):  # mlx-lm's, not a transformers quantizer's
        if hasattr(model_config, key):
            delattr(model_config, key)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    parameters = dict(model.named_parameters())
    tensors, bits = tensor_index(path), config["quantization"]["bits"]
    with reader(tensors) as read, torch.no_grad():
        for name in sorted(n for n in tensors if not n.endswith((".scales", ".biases"))):
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and f"{module}.scales" in tensors:
                value = affine.dequantize(read(name), read(f"{module}.scales"), read(f"{module}.biases"), bits)
            else:
                value = read(name)
            parameters.pop(name).copy_(value)
    model.tie_weights()
    if parameters.keys() - {"lm_head.weight"}:  # an untied lm_head must have been in the files
        raise BuilderError(Problem(path.name, sorted(parameters)[0], "missing from the MLX weights"))
    return model


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


def gate_problems(result: dict, gate: dict, spec_file: str) -> list:
    """A Problem for every figure beyond the gate's limit, naming the figure, its value and the limit."""
    found = []
    for figure, limit_key, unit in (("perplexity_increase_pct", "max_perplexity_increase_pct", " %"),
                                    ("mean_kl", "max_mean_kl", " nats")):
        limit = gate[limit_key]
        if limit is not None and result[figure] > limit:
            found.append(Problem(spec_file, f"eval.gate.{limit_key}", f"{figure} {result[figure]}{unit} exceeds "
                                 f"the gate's {limit}{unit} (perplexity {result['perplexity']['artifact']} vs "
                                 f"source {result['perplexity']['source']})"))
    return found


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
    problems = gate_problems(result, spec["eval"]["gate"], eval_file)
    result["dataset"] = spec["eval"]["dataset"]
    result["gate"] = {**spec["eval"]["gate"], "passed": not problems}
    log(f"eval: perplexity {result['perplexity']['artifact']} (source {result['perplexity']['source']}, "
        f"{result['perplexity_increase_pct']:+.3f} %), mean KL {result['mean_kl']}")
    return result


def require_gate(result: dict, spec: dict) -> None:
    """Raise CheckFailed (exit 1) naming each figure that misses the release's gate."""
    problems = gate_problems(result, spec["eval"]["gate"], f"specs/eval/{spec['choices']['eval']}.yaml")
    if problems:
        raise CheckFailed(problems)


def evaluate_artifact(root: Path, artifact: Path, spec: dict, overrides: list, option: str | None = None,
                      log=print) -> tuple:
    """(eval result, spec) for a built artifact of spec (its recorded release.json, built with
    overrides): its release's eval group, or the eval option given."""
    from builder.source import load
    from builder.release.resolve import resolve

    if option is not None:
        spec = resolve(root, spec["release"]["name"], (*overrides, f"eval={option}"))
    if spec["eval"]["dataset"] is None:
        raise BuilderError(Problem(f"specs/eval/{spec['choices']['eval']}.yaml", "eval.dataset",
                                   "null: the release measures nothing; pass --eval OPTION, e.g. --eval docstrings"))
    return evaluate(root, spec, load.source_dir(root, spec), artifact, log), spec
