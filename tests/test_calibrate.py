"""Layer-by-layer calibration and GPTQ: deterministic, and GPTQ beats round-to-nearest on its inputs."""

import json

import pytest
import torch
import yaml

from builder import build as build_module
from builder.quant import gptq, observe, quantize
from builder.release.recipe import Recipe
from conftest import PROJECT

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


@pytest.mark.parametrize("kind, strategy", [("float", "channel"), ("float", "tensor"), ("int", "channel")])
def test_gptq_on_8_bit_weights_beats_round_to_nearest_with_the_observers_scales(kind, strategy):
    x = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    weights = {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "observer": "mse"}
    recipe = Recipe.of({**RECIPE_DICT, "weights": weights})
    values, scale = gptq.quantize(weight, x.T @ x, recipe)
    searched = observe.weight_scale(weight, recipe.weights, torch.bfloat16)
    assert torch.equal(scale, searched)  # the observer's scales; GPTQ only chooses the values
    rtn = quantize.quantize_weight(weight, searched.float(), recipe.weights)
    assert values.dtype == rtn.dtype == (torch.float8_e4m3fn if kind == "float" else torch.int8)
    error = {name: ((x @ (q.float() * scale.float()).T) - x @ weight.T).norm() for name, q in
             (("gptq", values), ("rtn", rtn))}
    assert error["gptq"] < 0.95 * error["rtn"], error


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
    from builder.spill import Spill
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
    assert set(kept.gptq) and all(name in spilled.gptq for name in kept.gptq)
    for name, (values, scale) in kept.gptq.items():
        read_values, read_scale = spilled.gptq.get(name)
        assert torch.equal(read_values, values) and torch.equal(read_scale, scale)


def test_a_gptq_build_leaves_no_scratch_behind(calib_repo, tmp_path):
    out = tmp_path / "work" / "a"
    out.parent.mkdir()
    build_module.build(calib_repo.root, "tiny-llama-w4a16-gptq", SMALL, out=out, log=lambda message: None)
    left = sorted(p.name for p in out.parent.iterdir() if p.name != "a")
    assert left == [".a.lock", "a.buildinfo.json"]  # its lock file and buildinfo beside it; no staging, no scratch


def test_imatrix_mse_without_gptq_is_repeatable_records_its_observer_and_only_shrinks_scales(calib_repo, tmp_path):
    from safetensors.torch import load_file

    rtn = ("quant.algorithm=rtn", "quant.gptq=null", *SMALL)
    searched = (*rtn, "+quant.weights.observer=imatrix_mse")
    builds = {name: build_module.build(calib_repo.root, "tiny-llama-w4a16-gptq", overrides, out=tmp_path / name,
                                       log=lambda message: None)
              for name, overrides in (("one", searched), ("two", searched), ("minmax", rtn))}
    assert builds["one"]["content_digest"] == builds["two"]["content_digest"]
    weights = json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    assert weights["observer"] == "imatrix_mse"
    assert weights["observer_kwargs"] == {"grid": 20, "maxshrink": 0.95, "norm": 3.0, "patience": 5}
    found, plain = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "minmax"))
    scales = [name for name in plain if name.endswith("weight_scale")]
    assert scales and all(bool((found[name] <= plain[name]).all()) for name in scales)
    assert any(not torch.equal(found[name], plain[name]) for name in scales)  # the search moved some scale


def outlier_model(calib_repo, tmp_path):
    """The tiny Llama with one channel of layer 0's input norm 50x the others: (its folder, its tensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "outlier"
    shutil.copytree(calib_repo.root / "weights" / "tiny-llama", path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.input_layernorm.weight"][3] *= 50
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path, tensors


def q_proj_inputs(path, ids) -> torch.Tensor:
    """What layer 0's q_proj reads when the checkpoint at path runs ids: [tokens, hidden], FP32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    return seen["x"]


def builds_twice_with_a_folded_norm(calib_repo, tmp_path, release: str, overrides: tuple) -> None:
    """Two builds of release with overrides are the same bytes, the first writes layer 0's input norm
    other than the source's (the factors folded in), and transformers loads it with no missing keys."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    digests = [build_module.build(calib_repo.root, release, overrides, out=tmp_path / name,
                                  log=lambda message: None)["content_digest"] for name in ("one", "two")]
    assert digests[0] == digests[1]
    written = load_file(tmp_path / "one" / "model.safetensors")
    source = load_file(calib_repo.root / "weights" / "tiny-llama" / "model.safetensors")
    assert not torch.equal(written["model.layers.0.input_layernorm.weight"].float(),
                           source["model.layers.0.input_layernorm.weight"].float())
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "one", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True),
        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_smoothquant_moves_an_activation_outlier_into_the_weights_and_builds_a_repeatable_w8a8(calib_repo, tmp_path):
    """A channel 50x larger than the rest entering layer 0's q/k/v: SmoothQuant's factors shrink it
    relative to the others (alpha 0.5: to about its square root), and the build writes the smoothed
    norm in place of the source's, twice the same bytes, loadable by transformers."""
    from builder.quant import calibrate
    from builder.source import load

    path, tensors = outlier_model(calib_repo, tmp_path)
    recipe = Recipe.of({**RECIPE_DICT, "algorithm": "rtn", "gptq": None, "smoothing": {"alpha": 0.5},
                        "weights": {**RECIPE_DICT["weights"], "num_bits": 8, "strategy": "channel", "group_size": None},
                        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                              "dynamic": True, "group_size": None}})
    ids = torch.randint(1, 255, (4, 32), generator=torch.Generator().manual_seed(0))
    found = calibrate.calibrate(path, load.tensor_index(path), load.architecture(path)["modules"], recipe, ids,
                                log=lambda m: None)
    seen = {"x": q_proj_inputs(path, ids)}
    before = seen["x"].abs().amax(dim=0)
    after = (seen["x"] / found.smoothing["model.layers.0.input_layernorm.weight"]).abs().amax(dim=0)
    spread = lambda amax: float(amax[3] / amax.median())  # noqa: E731
    assert spread(before) > 20 and spread(after) < spread(before) / 3

    builds_twice_with_a_folded_norm(calib_repo, tmp_path, "tiny-llama-fp8-static",
                                    ("quant=w8a8-int8-smoothquant", "calibration.samples=4", "calibration.sequence_length=32"))


@pytest.mark.parametrize("overrides, message", [
    (("quant=w8a8-int8", "+quant.awq.grid=20"), "for weight-only compressed-tensors recipes"),
    (("quant=w8a8-int8-smoothquant", "+quant.awq.grid=20"), "both fold factors into the same norms"),
    (("+quant.awq.grid=1",), "1 is less than the minimum of 2"),
])
def test_awq_is_refused_with_quantized_activations_with_smoothquant_and_with_a_one_point_grid(
        calib_repo, overrides, message):
    from builder.errors import BuilderError
    from builder.release.resolve import resolve

    with pytest.raises(BuilderError) as caught:
        resolve(calib_repo.root, "tiny-llama-w4a16-gptq", overrides)
    assert any("quant.awq" in str(p) and message in str(p) for p in caught.value.problems), caught.value.problems


def test_smoothquant_is_refused_for_a_weight_only_recipe_naming_the_key(calib_repo):
    from builder.errors import BuilderError
    from builder.release.resolve import resolve

    with pytest.raises(BuilderError) as caught:
        resolve(calib_repo.root, "tiny-llama-w4a16-gptq", ("+quant.smoothing.alpha=0.5",))
    assert any("quant.smoothing" in str(p) and "needs quantized input_activations" in str(p)
               for p in caught.value.problems)



def test_awq_scaling_lowers_the_rounding_error_an_activation_outlier_causes_and_builds_repeatably(calib_repo, tmp_path):
    """A channel 50x larger than the rest entering layer 0's q/k/v: AWQ-style scaling keeps it finer
    in the weights, and the W4A16 weights it rounds give q/k/v outputs on the calibration tokens closer
    to the source's than round to nearest of the unscaled weights. A build writes the scaled norm,
    twice the same bytes, loadable by transformers."""
    from builder.quant import calibrate
    from builder.source import load

    path, tensors = outlier_model(calib_repo, tmp_path)
    ids = torch.randint(1, 255, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.of({**RECIPE_DICT, "algorithm": "rtn", "gptq": None, "awq": {"grid": 20}})
    found = calibrate.calibrate(path, load.tensor_index(path), load.architecture(path)["modules"], recipe, ids,
                                log=lambda m: None)
    factor = found.smoothing["model.layers.0.input_layernorm.weight"]
    assert found.smoothing["model.layers.0.self_attn.q_proj.weight"] is factor
    assert float(factor[3]) > 2 * float(factor.median())  # the outlier channel is kept finer in the weights

    seen = {"x": q_proj_inputs(path, ids)}
    x, errors = seen["x"], {"rtn": 0.0, "awq": 0.0}
    for projection in ("q_proj", "k_proj", "v_proj"):
        weight = tensors[f"model.layers.0.self_attn.{projection}.weight"].float()
        for name, scaling in (("rtn", torch.ones_like(factor)), ("awq", factor)):
            scaled = weight * scaling
            scale = quantize.weight_scale(scaled, recipe.weights, torch.bfloat16)
            restored = gptq.dequantize(quantize.quantize_weight(scaled, scale.float(), recipe.weights), scale,
                                            recipe.weights) / scaling
            errors[name] += float((x @ restored.T - x @ weight.T).square().sum())
    assert errors["awq"] < 0.9 * errors["rtn"], errors

    builds_twice_with_a_folded_norm(calib_repo, tmp_path, "tiny-llama-w4a16-gptq",
                                    ("quant=w4a16-gptq", "+quant.awq.grid=20", *SMALL))


# The steps each shipped recipe runs on every decoder layer, in order (calibrate.plan): what its fields ask for.
PLANS = {
    "bf16": (), "fp8-dynamic": (), "w8a8-int8": (), "w4a16": (), "gguf-q8_0": (), "mlx-4bit": (),
    "mlx-mxfp4": (), "mlx-nvfp4": (), "mlx-mxfp8": (),
    "fp8-block": (), "fp8-block-legacy": (),
    "nvfp4a16": (), "mxfp4a16": (), "mxfp4": (), "mxfp8": (), "w4afp8": (), "gpt-oss-mxfp4": (),
    "nvfp4": ("activations",),
    "fp8-static": ("activations", "kv_cache"),
    "w4a16-gptq": ("activations", "hessian", "gptq"),
    "fp8-dynamic-gptq-imatrix": ("activations", "hessian", "mean_squares", "gptq"),
    "fp8-static-gptq-imatrix": ("activations", "kv_cache", "hessian", "mean_squares", "gptq"),
    "w8a8-int8-gptq-imatrix": ("activations", "hessian", "mean_squares", "gptq"),
    "w4a16-gptq-imatrix": ("activations", "hessian", "mean_squares", "gptq"),
    "nvfp4a16-gptq-imatrix": ("activations", "hessian", "mean_squares", "gptq"),
    "nvfp4-gptq-imatrix": ("activations", "hessian", "mean_squares", "gptq"),
    "w4a16-awq-gptq-imatrix": ("activations", "hessian", "awq", "mean_squares", "gptq"),
    "w8a8-int8-smoothquant": ("smoothquant", "activations"),
    "w8a8-int8-smoothquant-gptq-imatrix": ("smoothquant", "activations", "hessian", "mean_squares", "gptq"),
    "gguf-q4_0": ("activations", "importance"),
    "gguf-q4_k_m": ("activations", "importance"), "gguf-q5_k_m": ("activations", "importance"),
}


@pytest.mark.parametrize("path", sorted((PROJECT / "specs" / "quant").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_shipped_recipe_runs_the_calibration_steps_its_fields_ask_for(path):
    from builder.quant import calibrate

    recipe = Recipe.of(yaml.safe_load(path.read_text()))
    steps = tuple(step.name for step in calibrate.plan(recipe)) if recipe.needs_calibration else ()
    assert steps == PLANS[path.stem]


def test_kv_cache_scales_and_awq_without_gptq_pull_in_only_the_steps_they_need():
    from builder.quant import calibrate

    kv = Recipe.of({**RECIPE_DICT, "algorithm": "rtn", "gptq": None, "kv_cache_scheme": {
        "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False, "group_size": None}})
    awq = Recipe.of({**RECIPE_DICT, "algorithm": "rtn", "gptq": None, "awq": {"grid": 20}})
    assert [step.name for step in calibrate.plan(kv)] == ["activations", "kv_cache"]
    assert [step.name for step in calibrate.plan(awq)] == ["activations", "hessian", "awq"]  # AWQ reads the Hessian


def test_a_new_step_is_one_value_it_sees_every_layers_targeted_linears_and_its_results_come_back(
        calib_repo, monkeypatch):
    """The protocol, with a step written here: hooks on the layer's Linears while its batches run, a
    finish per layer, its results merged under its key; nothing else in the builder changes."""
    from builder.quant import calibrate
    from builder.quant.step import Step, rows
    from builder.source import load

    def observe(layer, recipe):
        counted = {}
        for name, module in layer.linears.items():
            layer.on_input(module, lambda module, args, name=name: counted.__setitem__(
                name, counted.get(name, 0) + rows(args).shape[0]))
        return counted

    def finish(layer, recipe, seen):
        return {"tokens": {name: torch.tensor([count]) for name, count in seen["tokens"].items()}}

    tokens = Step("tokens", ("tokens",), {"algorithm": "gptq"}, observe=observe, finish=finish)
    monkeypatch.setattr(calibrate, "STEPS", (*calibrate.STEPS, tokens))
    path = calib_repo.root / "weights" / "tiny-llama"
    ids = torch.randint(1, 255, (6, 16), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.of({**RECIPE_DICT, "weights": {**RECIPE_DICT["weights"], "group_size": 32}})
    found = calibrate.calibrate(path, load.tensor_index(path), load.architecture(path)["modules"], recipe, ids,
                                log=lambda m: None)
    assert set(found.other["tokens"]) == set(found.gptq) == set(found.input_amax)
    assert {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)} <= set(found.other["tokens"])
    assert all(int(count) == 6 * 16 for count in found.other["tokens"].values())  # every token, every layer, once


def test_hooks_are_gone_after_each_layer_even_when_a_step_fails(calib_repo, monkeypatch):
    from builder.quant import calibrate
    from builder.quant.step import Step
    from builder.source import load

    layers = []

    def observe(layer, recipe):
        layers.append(layer)
        layer.on_input(next(iter(layer.linears.values())), lambda module, args: None)
        raise ValueError("broken step")

    monkeypatch.setattr(calibrate, "STEPS", (*calibrate.STEPS, Step("broken", (), {"algorithm": "gptq"},
                                                                    observe=observe)))
    path = calib_repo.root / "weights" / "tiny-llama"
    with pytest.raises(ValueError, match="broken step"):
        calibrate.calibrate(path, load.tensor_index(path), load.architecture(path)["modules"], RECIPE,
                            torch.randint(1, 255, (4, 16), generator=torch.Generator().manual_seed(0)),
                            log=lambda m: None)
    modules = list(layers[0].module.modules())
    assert not layers[0].removers and not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
