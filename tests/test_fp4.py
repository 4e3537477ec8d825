"""FP4, microscaled and W4AFP8 weights (quant nvfp4a16, nvfp4, mxfp4a16, mxfp4, mxfp8, w4afp8; builder/quant/fp4.py
and mx.py): compressed-tensors' own decompressors turn our artifacts back into exactly the values our writer
quantized to, transformers loads them with nothing missing or unexpected within a logit bound, global scales
are shared by the Linears vLLM fuses, a second build writes the same bytes, and resolve refuses what a
target cannot run."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import conftest
from builder import build
from builder.check import evaluate
from builder.errors import BuilderError
from builder.quant import fp4, mx
from builder.release.recipe import Recipe, problems
from conftest import Repo

# A tiny Llama whose Linears' input features are multiples of 128 (W4AFP8's group) and so of 16 and 32:
# q/o 256x256, k/v 128x256, gate/up 640x256, down 256x640.
MODEL = ("LlamaConfig", dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
                             tie_word_embeddings=False))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
# quant -> (target, compressed-tensors preset, format, max |logit difference| against the source).
# Bounds: measured maxima over 64 random tokens of the tiny random model (transformers 5.17, CPU, activations
# fake-quantized by compressed-tensors) were nvfp4a16 0.297, nvfp4 0.397, mxfp4a16 0.272, mxfp4 0.334, mxfp8
# 0.120, w4afp8 0.334 (fp8-block's 0.12 for comparison): each bound is ~1.5x its figure.
QUANTS = {
    "nvfp4a16": ("vllm-b200", "NVFP4A16", "nvfp4-pack-quantized", 0.45),
    "nvfp4": ("vllm-b200", "NVFP4", "nvfp4-pack-quantized", 0.6),
    "nvfp4a16-gptq-imatrix": ("vllm-b200", "NVFP4A16", "nvfp4-pack-quantized", 0.45),
    "nvfp4-gptq-imatrix": ("vllm-b200", "NVFP4", "nvfp4-pack-quantized", 0.6),
    "mxfp4a16": ("vllm-b200", "MXFP4A16", "mxfp4-pack-quantized", 0.4),
    "mxfp4": ("vllm-b200", "MXFP4", "mxfp4-pack-quantized", 0.5),
    "mxfp8": ("vllm-b200", "MXFP8", "mxfp8-quantized", 0.18),
    "w4afp8": ("vllm-gh200", "W4AFP8", "pack-quantized", 0.5),
}
CALIBRATION = "calibration:\n  samples: 4\n  sequence_length: 64\n"
CALIBRATED = ("nvfp4", "nvfp4a16-gptq-imatrix", "nvfp4-gptq-imatrix")  # the quants that read calibration text
GPTQ = ("nvfp4a16-gptq-imatrix", "nvfp4-gptq-imatrix")


def release_yaml(quant: str) -> str:
    target = QUANTS[quant][0]
    calibration = "licenses" if quant in CALIBRATED else "none"
    text = (f"# @package _global_\ndefaults:\n  - override /model: tiny-fp4\n  - override /quant: {quant}\n"
            f"  - override /target: {target}\n  - override /calibration: {calibration}\n\n"
            f"release:\n  name: tiny-fp4-{quant}\n  version: 0.0.1\n")
    return text + (CALIBRATION if quant in CALIBRATED else "")


@pytest.fixture(scope="module")
def fp4_repo(tmp_path_factory) -> Repo:
    repo = Repo.fresh(tmp_path_factory.mktemp("fp4") / "repo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(conftest.TINY, "tiny-fp4", MODEL)
        repo.add_model("tiny-fp4", tokenizer=True)
    for quant in QUANTS:
        (repo.root / "specs" / "release" / f"tiny-fp4-{quant}.yaml").write_text(release_yaml(quant))
    return repo


@pytest.fixture(scope="module")
def built(fp4_repo, tmp_path_factory) -> dict:
    """quant -> (artifact folder, manifest)."""
    out = tmp_path_factory.mktemp("fp4-out")
    return {quant: (out / quant, build.build(fp4_repo.root, f"tiny-fp4-{quant}", out=out / quant, log=lambda m: None))
            for quant in QUANTS}


def tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def source(repo: Repo) -> dict:
    return tensors(repo.root / "weights" / "tiny-fp4" / "model.safetensors")


def scheme_of(folder: Path):
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return config, QuantizationConfig.model_validate(config).config_groups["group_0"]


def shipped(quant: str, **changes) -> dict:
    data = yaml.safe_load((conftest.PROJECT / "specs" / "quant" / f"{quant}.yaml").read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


def test_e2m1_codes_are_compressed_tensors_rounding_and_packing():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA

    cast = getattr(FP4_E2M1_DATA.cast_to_fp4, "_torchdynamo_orig_callable", FP4_E2M1_DATA.cast_to_fp4)
    values = torch.cat([torch.linspace(-7, 7, 20000), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75,
                                                                    -2.5, -0.1, 0.0, 6.5])]).reshape(2, -1)
    codes = fp4.encode(values)
    assert torch.equal(codes[:, 0::2] | (codes[:, 1::2] << 4), pack_fp4_to_uint8(cast(values.clone())))
    assert torch.equal(fp4.decode(codes), cast(values.clone()))


def test_mx_exponents_are_compressed_tensors_mx_scales():
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    amax = torch.cat([torch.rand(500) * 100, torch.tensor([1.75, 1.7499, 3.5, 0.875, 448.0, 6.0])])
    weight = amax.reshape(-1, 1).expand(-1, 32).contiguous()
    for bits in (4, 8):
        assert torch.equal(mx.group_exponents(weight, 32, bits).reshape(-1), generate_mx_scales(amax, bits).to(torch.uint8))


@pytest.mark.parametrize("quant", QUANTS)
def test_config_is_the_compressed_tensors_preset(fp4_repo, built, quant):
    from compressed_tensors.quantization import preset_name_to_scheme

    config, scheme = scheme_of(built[quant][0])
    preset = preset_name_to_scheme(QUANTS[quant][1], ["Linear"])
    assert config["format"] == QUANTS[quant][2]
    found, expected = scheme.model_dump(mode="json"), preset.model_dump(mode="json")
    if quant in GPTQ:  # what chose the weights is recorded as llm-compressor records it; the arithmetic is the preset's
        assert (found["weights"].pop("observer"), found["weights"].pop("actorder")) == ("imatrix_mse", "static")
        found["weights"].pop("observer_kwargs")
        for key in ("observer", "actorder", "observer_kwargs"):
            expected["weights"].pop(key)
    for key in ("weights", "input_activations"):  # as compressed-tensors dumps them (its symmetric zp_dtype is dropped)
        assert found[key] == expected[key]


@pytest.mark.parametrize("quant", QUANTS)
def test_compressed_tensors_decompressor_returns_exactly_the_values_our_writer_quantized_to(fp4_repo, built, quant):
    from compressed_tensors.compressors import BaseCompressor

    folder, _ = built[quant]
    config, scheme = scheme_of(folder)
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    saved, weights = tensors(folder / "model.safetensors"), source(fp4_repo)
    for layer in range(2):
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            found = {name.removeprefix(module + "."): tensor for name, tensor in saved.items()
                     if name.startswith(module + ".")}
            expected = reference(quant, weights[f"{module}.weight"], found, weights, module)
            decompressed = compressor.decompress(dict(found), scheme)["weight"]
            assert torch.equal(decompressed.float(), expected.to(decompressed.dtype).float()), module


def unpacked(packed: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of nvfp4-pack-quantized's weight_packed (two a byte, the first in the low nibble)."""
    codes = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.uint8)
    codes[:, 0::2], codes[:, 1::2] = packed & 15, packed >> 4
    return codes


def reference(quant: str, weight: torch.Tensor, found: dict, weights: dict, module: str) -> torch.Tensor:
    """What our writer quantized to, decoded in FP32: codes or values times their scale, recomputed here from
    the source with builder/quant's arithmetic (and checked against the stored scales); GPTQ's codes and
    searched scales are read from the artifact (its global scale is still the fused max |w|'s)."""
    if quant.startswith("nvfp4"):
        linear = module.split(".", 3)[3]  # self_attn.q_proj
        members = [module[: -len(linear)] + member for member in next((g for g in FUSED if linear in g), (linear,))]
        amax = torch.stack([weights[f"{m}.weight"].abs().amax().float() for m in members]).amax().reshape(1)
        global_scale = fp4.global_scale(amax)
        assert torch.equal(found["weight_global_scale"], global_scale)
        if quant in GPTQ:
            return fp4.dequantize(unpacked(found["weight_packed"]), found["weight_scale"], global_scale, 16)
        scale = fp4.group_scales(weight, global_scale, 16)
        assert torch.equal(found["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
        codes = fp4.quantize_weight(weight, scale, global_scale, 16)
        return fp4.decode(codes) * (scale.float() / global_scale).repeat_interleave(16, 1)
    if quant.startswith("mx"):
        bits = 4 if quant.startswith("mxfp4") else 8
        exponents = mx.group_exponents(weight, 32, bits)
        assert torch.equal(found["weight_scale"], exponents)
        values = mx.quantize_weight(weight, exponents, 32, bits)
        decoded = fp4.decode(values) if bits == 4 else values.float()
        return decoded * mx.scales(exponents).repeat_interleave(32, 1)
    from builder.quant.quantize import quantize_weight, weight_scale  # w4afp8: the integer path

    args = Recipe.of(shipped("w4afp8")).weights
    scale = weight_scale(weight, args, torch.bfloat16)
    assert torch.equal(found["weight_scale"], scale)
    return quantize_weight(weight, scale.float(), args).float() * scale.float().repeat_interleave(128, 1)


def test_nvfp4_global_scales_are_shared_by_the_linears_vllm_fuses(built):
    for quant in ("nvfp4a16", "nvfp4", *GPTQ):
        saved = tensors(built[quant][0] / "model.safetensors")
        for layer in range(2):
            for group in FUSED:
                kinds = ("weight_global_scale", "input_global_scale") if quant in ("nvfp4", "nvfp4-gptq-imatrix") \
                    else ("weight_global_scale",)
                for kind in kinds:
                    scales = [saved[f"model.layers.{layer}.{member}.{kind}"] for member in group]
                    assert all(torch.equal(scales[0], other) for other in scales[1:]), (quant, group, kind)


def test_nvfp4_input_global_scale_comes_from_calibration(built):
    saved = tensors(built["nvfp4"][0] / "model.safetensors")
    scale = saved["model.layers.0.self_attn.q_proj.input_global_scale"]
    assert scale.dtype == torch.float32 and scale.shape == (1,) and 0 < float(scale) < 448 * 6 / 1e-3
    assert "model.layers.0.self_attn.q_proj.input_global_scale" not in tensors(
        built["nvfp4a16"][0] / "model.safetensors")


def logits_difference(repo: Repo, folder: Path) -> float:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_logits = AutoModelForCausalLM.from_pretrained(repo.root / "weights" / "tiny-fp4",
                                                                dtype=torch.float32)(tokens).logits
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    for parameter in model.parameters():  # compressed-tensors decompresses FP4 and MX weights to BF16
        parameter.data = parameter.data.float()
    with torch.no_grad():
        return float((model(tokens).logits - reference_logits).abs().max())


@pytest.mark.parametrize("quant", QUANTS)
def test_transformers_loads_the_artifact_within_the_logit_bound(fp4_repo, built, quant):
    difference = logits_difference(fp4_repo, built[quant][0])
    print(f"{quant}: max |logit difference| {difference:.4f}")
    assert 0 < difference <= QUANTS[quant][3]


@pytest.mark.parametrize("quant", QUANTS)
def test_the_builds_own_evaluation_measures_the_artifact_of_a_bf16_source(fp4_repo, built, quant):
    """builder build's quality gate and builder eval load it as transformers does, in FP32 (the FP4 and MX
    decompressors hand back BF16 weights: SmolLM2's FP4/MX releases failed their own build on that)."""
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    result = evaluate.measure(fp4_repo.root / "weights" / "tiny-fp4", built[quant][0], ids)
    assert 0 < result["mean_kl"] < 0.1 and result["perplexity"]["artifact"] > 1, result


def test_a_second_build_writes_the_same_bytes(fp4_repo, built, tmp_path):
    for quant in ("nvfp4", "mxfp4a16", "mxfp8", "nvfp4a16-gptq-imatrix"):
        again = build.build(fp4_repo.root, f"tiny-fp4-{quant}", out=tmp_path / quant, log=lambda m: None)
        assert again["content_digest"] == built[quant][1]["content_digest"]
    from builder.release.identity import OUTPUT_VERSIONS

    for quant, part in (("nvfp4", "quantize.nvfp4"), ("mxfp8", "quantize.mx")):  # the arithmetic's part keys the id
        assert built[quant][1]["inputs"]["versions"][part] == OUTPUT_VERSIONS[part]


@pytest.mark.parametrize("quant, scheme, part", [
    ("nvfp4a16", "nvfp4a16", "quantize.nvfp4"), ("nvfp4", "nvfp4", "quantize.nvfp4"),
    ("mxfp4a16", "mxfp4a16", "quantize.mx"), ("mxfp4", "mxfp4", "quantize.mx"), ("mxfp8", "mxfp8", "quantize.mx"),
    ("w4afp8", "w4afp8", "quantize.int"), ("nvfp4a16-gptq-imatrix", "nvfp4a16", "quantize.nvfp4"),
    ("nvfp4-gptq-imatrix", "nvfp4", "quantize.nvfp4")])
def test_the_shipped_recipes_are_consistent_and_name_their_part(quant, scheme, part):
    recipe = Recipe.of(shipped(quant))
    assert problems(recipe) == [] and recipe.scheme_class == scheme and part in recipe.parts
    assert recipe.needs_calibration == (quant in CALIBRATED)
    assert ({"gptq", "observer.imatrix_mse"} <= set(recipe.parts)) == (quant in GPTQ)


@pytest.mark.parametrize("quant, changes, key, words", [
    ("mxfp4a16", {"algorithm": "gptq", "gptq": {"block_size": 128, "dampening_frac": 0.01, "actorder": None}},
     ("quant", "algorithm"), "MX weights are rounded to nearest"),
    ("nvfp4a16", {"weights": {"observer": "mse"}}, ("quant", "weights", "observer"), "with algorithm gptq"),
    ("mxfp4a16", {"weights": {"observer": "mse"}}, ("quant", "weights", "observer"), "MX group scales"),
    ("nvfp4a16-gptq-imatrix", {"awq": {"grid": 20}}, ("quant", "awq"), "not folded into FP4"),
    ("nvfp4a16", {"weights": {"group_size": 32}}, ("quant", "weights"), "nvfp4a16: weights"),
    ("nvfp4a16", {"weights": {"scale_dtype": None}}, ("quant", "weights"), "exactly their arguments"),
    ("nvfp4a16", {"format": "fp8"}, ("quant", "format"), "compressed-tensors formats"),
], ids=["mx-gptq", "nvfp4-rtn-mse", "mx-mse", "nvfp4-awq", "group-32", "no-scale-dtype", "fp8-layout"])
def test_resolve_refuses_fp4_recipes_it_does_not_round(quant, changes, key, words):
    found = problems(Recipe.of(shipped(quant, **changes)))
    assert any(path == key and words in message for path, message in found), found


@pytest.mark.parametrize("quant, target, scheme", [("nvfp4", "vllm-h200", "nvfp4"), ("mxfp8", "vllm-h100", "mxfp8"),
                                                   ("nvfp4a16", "vllm-a100", "nvfp4a16"),
                                                   ("w4afp8", "vllm-b200", "w4afp8")])
def test_targets_without_the_kernels_refuse_the_recipe_naming_what_they_run(fp4_repo, quant, target, scheme):
    from builder.release.resolve import resolve

    with pytest.raises(BuilderError, match=f"does not run {scheme} .*it runs: w16a16"):
        resolve(fp4_repo.root, f"tiny-fp4-{quant}", (f"target={target}",))


def test_the_cli_refuses_nvfp4_on_hopper_with_exit_2(fp4_repo):
    result = fp4_repo.run("resolve", "tiny-fp4-nvfp4", "target=vllm-h100")
    assert result.returncode == 2 and "does not run nvfp4" in result.stderr


def test_smollm2_fits_groups_of_16_and_32_but_not_w4afp8s_128():
    from builder.release.resolve import resolve

    for quant, target in (("nvfp4a16", "vllm-b200"), ("mxfp8", "vllm-b200"), ("mxfp4a16", "vllm-gh200")):
        resolve(conftest.PROJECT, "smollm2-135m-instruct-fp8-dynamic", (f"quant={quant}", f"target={target}"))
    with pytest.raises(BuilderError, match="128 does not divide the 576 input features"):
        resolve(conftest.PROJECT, "smollm2-135m-instruct-fp8-dynamic", ("quant=w4afp8", "target=vllm-gh200"))


def test_w4afp8_weights_take_gptq_as_w4a16_does(fp4_repo, built, tmp_path):
    """W4AFP8's weights are the integer path, so GPTQ (on calibration text) rounds them; the layout is the same."""
    overrides = ("quant.algorithm=gptq", "quant.gptq={block_size:128,dampening_frac:0.01,actorder:static}",
                 "calibration=licenses", "calibration.samples=4", "calibration.sequence_length=64")
    manifest = build.build(fp4_repo.root, "tiny-fp4-w4afp8", overrides, out=tmp_path / "gptq", log=lambda m: None)
    assert manifest["inputs"]["versions"].keys() >= {"gptq", "calibration", "quantize.int"}
    rtn, gptq = (tensors(folder / "model.safetensors") for folder in (built["w4afp8"][0], tmp_path / "gptq"))
    assert rtn.keys() == gptq.keys()
    module = "model.layers.0.mlp.down_proj"
    assert not torch.equal(rtn[f"{module}.weight_packed"], gptq[f"{module}.weight_packed"])
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["actorder"] == "static"
    assert logits_difference(fp4_repo, tmp_path / "gptq") <= QUANTS["w4afp8"][3]


def test_zero_groups_and_tensors_get_the_scales_compressed_tensors_gives_them():
    weight = torch.zeros(4, 32)
    weight[0, :16] = torch.linspace(-3, 3, 16)
    global_scale = fp4.global_scale(weight.abs().amax())
    assert torch.equal(global_scale, torch.tensor([448 * 6 / 3.0]))
    assert torch.equal(fp4.global_scale(torch.zeros(1)), torch.ones(1))  # an all-zero tensor: no global scaling
    scale = fp4.group_scales(weight, global_scale, 16)
    assert float(scale[0, 0].float()) == 448 and (scale[1:].float() == 0.125).all()  # 0 -> FP8's eps, 0.125
    codes = fp4.quantize_weight(weight, scale, global_scale, 16)
    assert (codes[1:] == 0).all() and float(fp4.decode(codes[0, :1])) == -6.0
    assert (mx.group_exponents(torch.zeros(2, 32), 32, 4) == 127).all()  # scale 1


def test_a_weight_with_nan_is_refused_naming_it():
    from builder.quant.quantize import rounded

    weight = torch.ones(4, 32)
    weight[1, 3] = float("nan")
    for quant in ("nvfp4a16", "mxfp8"):
        with pytest.raises(BuilderError, match="model.layers.0.mlp.up_proj.weight: holds NaN"):
            rounded("model.layers.0.mlp.up_proj.weight", weight, torch.bfloat16, Recipe.of(shipped(quant)))
