"""Quantized layouts (INT8 W8A8, INT4 pack-quantized, FP8 static + KV cache) as compressed-tensors reads them."""

import json

import pytest
import torch
import yaml

from builder import build as build_module
from builder.formats import compressed_tensors
from builder.quant import quantize
from builder.release.recipe import Args
from conftest import release_text
from test_build import tensors

SMALL = ("calibration.samples=4", "calibration.sequence_length=32")


def built(repo, release, out, overrides=()):
    return build_module.build(repo.root, release, tuple(overrides), out=out, log=lambda message: None)


def load(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True),
        output_loading_info=True)
    return model, info


def test_pack_matches_compressed_tensors_unpacking():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    values = torch.randint(-8, 8, (6, 20), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = compressed_tensors.pack(values, 4)
    assert packed.dtype == torch.int32 and packed.shape == (6, 3)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((6, 20))).to(torch.int8), values)


@pytest.mark.parametrize("recipe,weight_names", [
    ("w8a8-int8", {"weight": (torch.int8, "full"), "weight_scale": (torch.bfloat16, "channel")}),
    ("w4a16", {"weight_packed": (torch.int32, "packed"), "weight_scale": (torch.bfloat16, "group"),
               "weight_shape": (torch.int64, (2,))}),
])
def test_integer_recipes_write_compressed_tensors_names_and_load_in_transformers(calib_repo, tmp_path, recipe,
                                                                                   weight_names):
    name = f"tiny-llama-{recipe}"
    (calib_repo.root / "specs" / "release" / f"{name}.yaml").write_text(
        release_text(name, "tiny-llama", recipe, "vllm-h100"))
    overrides = ("quant.weights.group_size=32",) if recipe == "w4a16" else ()
    built(calib_repo, name, tmp_path / "a", overrides)
    out = tensors(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["format"] == ("pack-quantized" if recipe == "w4a16" else "int-quantized")
    module = "model.layers.0.mlp.down_proj"  # 128 input features, 64 outputs
    assert {n[len(module) + 1:] for n in out if n.startswith(module + ".")} == set(weight_names)
    shapes = {"full": (64, 128), "channel": (64, 1), "group": (64, 4), "packed": (64, 16)}
    for suffix, (dtype, shape) in weight_names.items():
        tensor = out[f"{module}.{suffix}"]
        assert tensor.dtype == dtype
        assert tuple(tensor.shape) == (shapes[shape] if isinstance(shape, str) else shape)
    model, info = load(tmp_path / "a")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source = tensors(calib_repo.root / "weights" / "tiny-llama")[f"{module}.weight"].float()
    restored = model.model.layers[0].mlp.down_proj.weight.float()
    step = 2 * source.abs().amax(dim=1, keepdim=True) / (255 if recipe == "w8a8-int8" else 15)
    # half a step, plus the clamp at q_max when BF16 rounds a scale down (relative error <= 2^-8) and
    # amax lands past q_max: amax / scale <= 7.5 * (1 + 2^-8)
    assert torch.all((restored - source).abs() <= step * (0.5 + 8 * 2 ** -8) + 1e-6)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_fp8_static_writes_calibrated_input_and_kv_scales_that_transformers_loads(calib_repo, tmp_path):
    dump = tmp_path / "stats.json"
    build_module.build(calib_repo.root, "tiny-llama-fp8-static", SMALL, out=tmp_path / "a",
                       log=lambda message: None, calibration_dump=dump)
    out = tensors(tmp_path / "a")
    layer = "model.layers.1.self_attn"
    assert out[f"{layer}.q_proj.weight"].dtype == torch.float8_e4m3fn
    for name in (f"{layer}.q_proj.weight_scale", f"{layer}.q_proj.input_scale", f"{layer}.k_scale",
                 f"{layer}.v_scale"):
        assert out[name].dtype == torch.bfloat16 and out[name].shape == (1,), name
    stats = json.loads(dump.read_text())
    assert out[f"{layer}.q_proj.input_scale"].float() == pytest.approx(
        stats["input_amax"][f"{layer}.q_proj"] / 448, rel=2 ** -7)
    assert out[f"{layer}.k_scale"].float() == pytest.approx(stats["kv_amax"][f"{layer}.k_scale"] / 448, rel=2 ** -7)
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["type"] == "float" and config["kv_cache_scheme"]["dynamic"] is False
    model, info = load(tmp_path / "a")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    attention = model.model.layers[1].self_attn
    assert attention.k_scale.float() == out[f"{layer}.k_scale"].float()
    assert model.model.layers[1].self_attn.q_proj.input_scale.float() == out[f"{layer}.q_proj.input_scale"].float()


def test_legacy_fp8_layout_writes_autofp8_names_and_scalar_f32_scales(calib_repo, tmp_path):
    built(calib_repo, "tiny-llama-fp8-static", tmp_path / "a", (*SMALL, "quant.format=fp8"))
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"],
                      "kv_cache_scheme": "static"}
    out = tensors(tmp_path / "a")
    attention = "model.layers.0.self_attn"
    assert out[f"{attention}.o_proj.weight"].dtype == torch.float8_e4m3fn
    for name in (f"{attention}.o_proj.weight_scale", f"{attention}.o_proj.input_scale",
                 f"{attention}.k_proj.output_scale", f"{attention}.v_proj.output_scale"):
        assert out[name].dtype == torch.float32 and out[name].shape == (), name
    assert not any(name.endswith(("k_scale", "v_scale")) for name in out)
    source = tensors(calib_repo.root / "weights" / "tiny-llama")[f"{attention}.o_proj.weight"].float()
    restored = out[f"{attention}.o_proj.weight"].float() * out[f"{attention}.o_proj.weight_scale"]
    assert torch.allclose(restored, source, rtol=2 ** -4, atol=float(out[f"{attention}.o_proj.weight_scale"]) * 2 ** -9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["float", "int"])
def test_zero_and_tiny_rows_get_the_scale_compressed_tensors_stores_never_zero(dtype, kind):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    args = Args(num_bits=8, type=kind, strategy="channel", symmetric=True, dynamic=False, group_size=None)
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-5, -1e-5, 1e-5, 0.0], [0.5, -0.25, 0.125, 1.0]])
    weight = weight.to(dtype).float()  # source weights come in the model's dtype
    scale = quantize.weight_scale(weight, args, dtype)
    amax = weight.abs().amax(dim=1, keepdim=True).to(dtype)
    theirs, _ = calculate_qparams(-amax, amax, QuantizationArgs(**args.as_dict()))
    assert scale.dtype == dtype and torch.equal(scale, theirs.to(dtype))  # the same bytes as compressed-tensors
    assert bool((scale > 0).all())
    values = quantize.quantize_weight(weight, scale.float(), args).float()
    assert bool(torch.isfinite(values).all()) and torch.equal(values[0], torch.zeros(4))
    restored = values * scale.float()
    assert float((restored[:2] - weight[:2]).abs().max()) < 1e-5  # zero and tiny rows come back as they were


def test_a_source_weight_holding_nan_or_infinity_is_refused_naming_it(repo):
    from safetensors.torch import load_file, save_file

    from builder.canonical import file_entries, tree_digest

    weights = repo.add_model("tiny-llama")
    tensors = load_file(weights / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, weights / "model.safetensors", metadata={"format": "pt"})
    spec_file = repo.root / "specs" / "model" / "tiny-llama.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["digest"] = tree_digest(file_entries(weights))
    spec_file.write_text(yaml.safe_dump(spec))
    for release, tensor in (("tiny-llama-fp8-dynamic", "model.layers.1.mlp.up_proj.weight"),
                            ("tiny-llama-bf16", "model.layers.1.mlp.up_proj.weight")):
        result = repo.run("build", release, check=2)
        assert f"{tensor}: holds NaN or infinite values" in result.stderr and "Traceback" not in result.stderr
    assert not (repo.root / "artifacts").exists() or not any((repo.root / "artifacts").iterdir())


@pytest.mark.parametrize("module, group", [
    ("model.layers.0.self_attn.k_proj", ("q_proj", "k_proj", "v_proj")),
    ("model.layers.0.mlp.up_proj", ("gate_proj", "up_proj")),
    ("model.layers.0.block_sparse_moe.experts.3.w3", ("w1", "w3")),  # Mixtral's expert names
    ("model.layers.1.mlp.experts.3.up_proj", ("gate_proj", "up_proj")),
    ("model.layers.1.mlp.shared_experts.gate_proj", ("gate_proj", "up_proj")),
    ("model.layers.0.feed_forward.gate_proj", ("gate_proj", "up_proj")),  # Llama 4's dense MLP
    ("model.layers.1.mlp.shared_expert_gate", ("shared_expert_gate",)),
    ("model.layers.0.self_attn.o_proj", ("o_proj",)),
    ("model.layers.0.self_attn.qkv_proj", ("qkv_proj",)),  # Phi-3's, one Linear on disk already
    ("model.layers.3.self_attn.v_proj", ("q_proj", "k_proj", "v_proj")),  # Qwen3-Next's full attention
    ("model.layers.0.self_attn.kv_a_proj_with_mqa", ("q_a_proj", "kv_a_proj_with_mqa")),  # DeepSeek-V3's MLA
    ("model.layers.0.self_attn.kv_b_proj", ("kv_b_proj",)),
    ("model.layers.1.block_sparse_moe.experts.2.w1", ("w1", "w3")),  # MiniMax (no MoE row)
    ("model.layers.1.linear_attn.in_proj_qkvz", ("in_proj_qkvz",)),
])
def test_nvfp4_global_scales_are_shared_by_the_linears_vllm_fuses(module, group):
    """By name alone, whatever the family (with a row or not)."""
    stem = module.rpartition(".")[0]
    assert quantize.fused(module) == tuple(f"{stem}.{leaf}" for leaf in group)
