"""Resolving quantization recipes (builder/resolve.py): calibrated, 4-bit and legacy-layout choices."""

import pytest

from builder.errors import BuilderError
from builder.release.resolve import resolve

RELEASE = "smollm2-135m-instruct-bf16"


def problems(repo, *overrides):
    with pytest.raises(BuilderError) as caught:
        resolve(repo.root, RELEASE, overrides)
    return [str(problem) for problem in caught.value.problems]


def test_resolve_rejects_a_group_size_that_does_not_divide_a_layer_naming_the_layer(repo):
    found = problems(repo, "quant=w4a16", "target=vllm-h100")
    assert any("model.layers.*.self_attn.q_proj" in p and "128 does not divide the 576" in p for p in found)
    assert not any("down_proj" in p for p in found)  # 1536 = 12 x 128


def test_resolve_accepts_group_64_for_smollm2(repo):
    spec = resolve(repo.root, RELEASE, ("quant=w4a16", "target=vllm-h100", "quant.weights.group_size=64"))
    assert spec["quant"]["weights"]["group_size"] == 64


def test_resolve_requires_calibration_data_for_static_scales_gptq_and_imatrix_mse(repo):
    for recipe in (("quant=fp8-static", "quant.weights.group_size=null"),
                   ("quant=w4a16-gptq", "quant.weights.group_size=64"),
                   ("quant=w4a16", "quant.weights.group_size=64", "+quant.weights.observer=imatrix_mse")):
        found = problems(repo, *recipe, "target=vllm-h100")
        assert found == ["specs/calibration/none.yaml: calibration.dataset: null, but the recipe calibrates "
                         "(static scales, KV-cache scales, GPTQ, imatrix_mse or SmoothQuant); choose a calibration group, e.g. "
                         "calibration=licenses"]
    spec = resolve(repo.root, RELEASE, ("quant=fp8-dynamic", "+quant.weights.observer=mse"))
    assert spec["quant"]["weights"]["observer"] == "mse"  # mse searches the weights alone: no calibration
    spec = resolve(repo.root, RELEASE, ("quant=fp8-static", "target=vllm-h100", "calibration=licenses"))
    assert spec["quant"]["input_activations"]["dynamic"] is False


def test_resolve_rejects_4_bit_activations_and_accepts_gptq_on_float_weights(repo):
    found = problems(repo, "quant=w8a8-int8", "quant.input_activations.num_bits=4", "quant.algorithm=gptq",
                     "quant.gptq={block_size:128,dampening_frac:0.01,actorder:static}", "calibration=licenses")
    assert any("activations are 8-bit" in p for p in found)
    spec = resolve(repo.root, RELEASE, ("quant=fp8-dynamic", "quant.algorithm=gptq", "calibration=licenses",
                                        "quant.gptq={block_size:128,dampening_frac:0.01,actorder:static}"))
    assert spec["quant"]["weights"]["type"] == "float" and spec["quant"]["algorithm"] == "gptq"


def test_resolve_rejects_observers_on_activations_unknown_observers_and_their_unknown_settings(repo):
    found = problems(repo, "quant=fp8-static", "calibration=licenses", "target=vllm-h100",
                     "+quant.input_activations.observer=mse", "+quant.weights.observer_kwargs={grid:20}")
    assert any("quant.input_activations.observer" in p and "scale search is for weights" in p for p in found)
    assert any("quant.weights.observer_kwargs" in p and "grid: not a setting of observer minmax (allowed: none)"
               in p for p in found)
    found = problems(repo, "quant=fp8-dynamic", "+quant.weights.observer=mse", "+quant.weights.observer_kwargs.shrink=1")
    assert any("quant.weights.observer_kwargs.shrink: unknown key; allowed keys: grid, maxshrink, norm, patience"
               in p for p in found)
    found = problems(repo, "quant=fp8-dynamic", "+quant.weights.observer=awq")
    assert any("quant.weights.observer" in p and "imatrix_mse" in p for p in found)
    found = problems(repo, "quant=fp8-dynamic", "+quant.weights.observer=mse", "+quant.weights.observer_kwargs.maxshrink=1")
    assert any("quant.weights.observer_kwargs.maxshrink" in p for p in found)


def test_resolve_rejects_the_legacy_fp8_layout_for_per_channel_weights(repo):
    found = problems(repo, "quant=fp8-dynamic", "quant.format=fp8")
    assert any("quant.format" in p and "per-tensor" in p for p in found)
    spec = resolve(repo.root, RELEASE, ("quant=fp8-static", "quant.format=fp8", "calibration=licenses",
                                        "target=vllm-h100"))
    assert spec["quant"]["format"] == "fp8"


def test_resolve_rejects_an_eval_gate_with_unknown_keys(repo):
    found = problems(repo, "eval=docstrings", "+eval.gate.max_loss=1")
    assert any("eval.gate.max_loss" in p and "unknown key" in p for p in found)
