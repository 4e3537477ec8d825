"""Layer-by-layer calibration and GPTQ: deterministic, and GPTQ beats round-to-nearest on its inputs."""

import json

import torch

from builder import build as build_module
from builder.quant import gptq, quantize
from builder.spec.recipe import Recipe

SMALL = ("calibration.samples=4", "calibration.sequence_length=32", "quant.weights.group_size=32")
RECIPE_DICT = {"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "gptq", "targets": ["Linear"],
               "ignore": [], "input_activations": None, "kv_cache_scheme": None,
               "weights": {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True,
                           "dynamic": False, "group_size": 16},
               "gptq": {"block_size": 8, "dampening_frac": 0.01, "actorder": "static"}}
RECIPE = Recipe.of(RECIPE_DICT)


def correlated_inputs(rows=512, features=64):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(features, features, generator=generator)
    return torch.randn(rows, features, generator=generator) @ mixing


def test_gptq_has_lower_output_error_than_round_to_nearest_on_its_calibration_inputs():
    x = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    values, scale = gptq.quantize(weight, x.T @ x, RECIPE)
    rtn_scale = quantize.weight_scale(weight, RECIPE.weights, torch.bfloat16)
    assert torch.equal(scale, rtn_scale)  # same scales: only the rounding differs
    rtn = quantize.quantize_weight(weight, rtn_scale.float(), RECIPE.weights)
    expanded = scale.float().repeat_interleave(16, dim=1)
    error = {name: ((x @ (q.float() * expanded).T) - x @ weight.T).norm() for name, q in
             (("gptq", values), ("rtn", rtn))}
    assert values.dtype == torch.int8 and int(values.min()) >= -8 and int(values.max()) <= 7
    assert error["gptq"] < 0.8 * error["rtn"], error


def test_gptq_artifact_is_bit_for_bit_repeatable_and_loads_in_transformers(calib_repo, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    digests = [build_module.build(calib_repo.root, "tiny-llama-w4a16-gptq", SMALL, out=tmp_path / name,
                                  log=lambda message: None)["content_digest"] for name in ("one", "two")]
    assert digests[0] == digests[1]
    config = json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "one", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True),
        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_fp8_static_calibration_is_repeatable(calib_repo, tmp_path):
    overrides = ("calibration.samples=4", "calibration.sequence_length=32")
    first, second = (build_module.build(calib_repo.root, "tiny-llama-fp8-static", overrides, out=tmp_path / name,
                                        log=lambda message: None) for name in ("a", "b"))
    assert first["content_digest"] == second["content_digest"]


def test_gptq_results_go_to_disk_layer_by_layer_and_read_back_the_same(calib_repo, tmp_path):
    from builder.quant import calibrate
    from builder.quant.spill import Spill
    from builder.source import load

    path = calib_repo.root / "weights" / "tiny-llama"
    tensors, architecture = load.tensor_index(path), load.architecture(path)
    ids = torch.randint(1, 255, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.of({**RECIPE_DICT, "weights": {**RECIPE_DICT["weights"], "group_size": 32}})
    kept = calibrate.calibrate(path, tensors, architecture["modules"], recipe, ids, log=lambda m: None)
    spilled = calibrate.calibrate(path, tensors, architecture["modules"], recipe, ids, log=lambda m: None,
                                  spill=Spill(tmp_path / "spill"))
    files = sorted(p.name for p in (tmp_path / "spill").iterdir())
    assert files == ["gptq-00000.safetensors", "gptq-00001.safetensors"]  # one per decoder layer, as it finishes
    assert set(kept["gptq"]) and all(name in spilled["gptq"] for name in kept["gptq"])
    for name, (values, scale) in kept["gptq"].items():
        read_values, read_scale = spilled["gptq"].get(name)
        assert torch.equal(read_values, values) and torch.equal(read_scale, scale)


def test_a_gptq_build_leaves_no_scratch_behind(calib_repo, tmp_path):
    out = tmp_path / "work" / "a"
    out.parent.mkdir()
    build_module.build(calib_repo.root, "tiny-llama-w4a16-gptq", SMALL, out=out, log=lambda message: None)
    left = [p.name for p in out.parent.iterdir() if p.name != "a"]
    assert left == [".a.lock"]  # the output's lock file stays beside it; no staging, no scratch
