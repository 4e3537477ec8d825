"""FP8 block-wise weights (quant fp8-block, fp8-block-legacy; builder/quant/blocks.py): compressed-tensors'
own quantizer and decompressor agree with our bytes, transformers loads both layouts, the legacy layout
holds what vLLM's fp8 loader reads, and a second build writes the same bytes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import conftest
from builder import build
from builder.errors import BuilderError
from builder.quant import blocks
from builder.quant.quantize import scale_from_amax
from builder.release.recipe import Args, Recipe, problems
from conftest import Repo, release_text

# A tiny Llama whose Linears are multiples of 128 (vLLM's block kernels need it; see specs/quant/fp8-block.yaml):
# q/o 256x256, k/v 128x256, gate/up 640x256, down 256x640, so scales are [1..5, 2..5] blocks.
BLOCKS_MODEL = ("LlamaConfig", dict(hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
                                    tie_word_embeddings=False))
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
# What vLLM's `fp8` quantization reads of a block-quantized checkpoint, taken from its source
# (vllm/model_executor/layers/quantization/fp8.py): Fp8Config.from_config reads these config keys
# (quant_method must contain "fp8"; weight_block_size must have 2 entries; block quantization
# requires activation_scheme "dynamic"), and Fp8LinearMethod.create_weights registers, for each
# quantized Linear, `weight` (float8_e4m3fn, [out, in]) and `weight_scale_inv` (float32,
# [ceil(out / block_n), ceil(in / block_k)]) and no input_scale with dynamic activations.
VLLM_FP8_CONFIG_KEYS = {"quant_method", "activation_scheme", "ignored_layers", "weight_block_size"}
VLLM_BLOCK_TENSORS = {"weight": "F8_E4M3", "weight_scale_inv": "F32"}
# Logits of the tiny random model (|logit| up to ~1.1) after FP8 block weights and FP8 group-128
# activations: measured 0.12 (compressed-tensors) and 0.09 (legacy, weight-only in transformers).
MAX_LOGIT_DIFFERENCE = 0.25


@pytest.fixture(scope="module")
def block_repo(tmp_path_factory) -> Repo:
    """A repository with the 128-multiple tiny Llama and a release of each fp8-block recipe for vllm-h200."""
    repo = Repo.fresh(tmp_path_factory.mktemp("fp8block") / "repo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(conftest.TINY, "tiny-blocks", BLOCKS_MODEL)
        repo.add_model("tiny-blocks")
    for quant in ("fp8-block", "fp8-block-legacy"):
        text = release_text(f"tiny-blocks-{quant}", "tiny-blocks", quant, "vllm-h200")
        (repo.root / "specs" / "release" / f"tiny-blocks-{quant}.yaml").write_text(text)
    return repo


@pytest.fixture(scope="module")
def built(block_repo, tmp_path_factory) -> dict:
    """quant -> (artifact folder, manifest)."""
    out = tmp_path_factory.mktemp("fp8block-out")
    found = {}
    for quant in ("fp8-block", "fp8-block-legacy"):
        folder = out / quant
        found[quant] = folder, build.build(block_repo.root, f"tiny-blocks-{quant}", out=folder, log=lambda m: None)
    return found


def tensors(path: Path) -> dict:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def source_tensors(repo: Repo) -> dict:
    return tensors(repo.root / "weights" / "tiny-blocks" / "model.safetensors")


def block_args(block: list) -> Args:
    return Args.of({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": block,
                    "symmetric": True, "dynamic": False, "group_size": None})


def test_block_values_on_partial_blocks_are_compressed_tensors_own_quantization():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    torch.manual_seed(0)
    weight = (torch.randn(200, 300) * 0.05).to(torch.bfloat16)  # 2 x 3 blocks, the last row and column partial
    args = block_args([128, 128])
    amax = blocks.block_amax(weight, [128, 128])
    padded = torch.nn.functional.pad(weight.float().abs(), (0, 84, 0, 56))
    assert torch.equal(amax, padded.reshape(2, 128, 3, 128).amax(dim=(1, 3)))
    scale = scale_from_amax(amax, args, torch.bfloat16)
    ours = blocks.quantize_weight(weight, scale.float(), [128, 128])
    theirs = quantize(x=weight.float(), scale=scale.float(), zero_point=None,
                      args=QuantizationArgs(**args.as_dict()), dtype=torch.float8_e4m3fn)
    assert ours.shape == (200, 300) and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


def test_compressed_tensors_artifact_holds_fp8_blocks_with_the_fp8_block_preset_config(block_repo, built):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from test_compressed_tensors import compressed_tensors_dump

    folder, _ = built["fp8-block"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == compressed_tensors_dump(build_quant(block_repo, "fp8-block"))  # as its models dump it
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    preset = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    assert config["format"] == "float-quantized"
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations
    saved = tensors(folder / "model.safetensors")
    for layer in range(2):
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            rows, columns = saved[f"{module}.weight"].shape
            assert saved[f"{module}.weight"].dtype == torch.float8_e4m3fn
            assert saved[f"{module}.weight_scale"].shape == (-(-rows // 128), -(-columns // 128))
            assert saved[f"{module}.weight_scale"].dtype == torch.bfloat16


def test_compressed_tensors_decompressor_returns_exactly_the_values_our_writer_quantized_to(block_repo, built):
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    folder, _ = built["fp8-block"]
    scheme = QuantizationConfig.model_validate(
        json.loads((folder / "config.json").read_text())["quantization_config"]).config_groups["group_0"]
    saved, source = tensors(folder / "model.safetensors"), source_tensors(block_repo)
    args = Recipe.of(build_quant(block_repo, "fp8-block")).weights
    for layer in range(2):
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            values, scale = saved[f"{module}.weight"], saved[f"{module}.weight_scale"]
            amax = blocks.block_amax(source[f"{module}.weight"], [128, 128])
            assert torch.equal(scale, scale_from_amax(amax, args, torch.bfloat16))
            written = blocks.quantize_weight(source[f"{module}.weight"], scale.float(), [128, 128])
            assert torch.equal(values.view(torch.uint8), written.view(torch.uint8))  # our writer's values
            decompressed = FloatQuantizationCompressor.decompress(
                {"weight": values, "weight_scale": scale}, scheme)["weight"]
            expanded = scale.repeat_interleave(128, 0)[: values.shape[0]].repeat_interleave(128, 1)[:, : values.shape[1]]
            assert torch.equal(decompressed, values.to(scale.dtype) * expanded)  # bit for bit, value times its block's scale


def build_quant(repo: Repo, quant: str) -> dict:
    from builder.release.resolve import resolve

    return resolve(repo.root, f"tiny-blocks-{quant}")["quant"]


def logits_difference(source: Path, folder: Path, **kwargs) -> float:
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(tokens).logits
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    with torch.no_grad():
        return float((model(tokens).logits - reference).abs().max())


def test_transformers_loads_the_compressed_tensors_artifact_within_the_logit_bound(block_repo, built):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    folder, _ = built["fp8-block"]
    difference = logits_difference(block_repo.root / "weights" / "tiny-blocks", folder,
                                   quantization_config=CompressedTensorsConfig(dequantize=True))
    assert 0 < difference <= MAX_LOGIT_DIFFERENCE


def test_legacy_artifact_holds_the_tensors_and_config_keys_vllm_fp8_block_loader_reads(block_repo, built):
    folder, _ = built["fp8-block-legacy"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert set(config) == VLLM_FP8_CONFIG_KEYS
    assert "fp8" in config["quant_method"] and config["activation_scheme"] == "dynamic"
    assert config["weight_block_size"] == [128, 128] and config["ignored_layers"] == ["lm_head"]
    block_n, block_k = config["weight_block_size"]
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        header = {name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape())
                  for name in handle.keys()}
    for layer in range(2):
        for linear in LINEARS:
            module = f"model.layers.{layer}.{linear}"
            found = {name.removeprefix(module + "."): dtype for name, (dtype, _) in header.items()
                     if name.startswith(module + ".")}
            assert found == VLLM_BLOCK_TENSORS
            rows, columns = header[f"{module}.weight"][1]
            assert header[f"{module}.weight_scale_inv"][1] == [-(-rows // block_n), -(-columns // block_k)]
    assert header["lm_head.weight"][0] == "BF16"
    difference = logits_difference(block_repo.root / "weights" / "tiny-blocks", folder)  # transformers' fp8 loader
    assert 0 < difference <= MAX_LOGIT_DIFFERENCE


def test_legacy_scales_are_the_f32_block_scales_of_the_same_arithmetic(block_repo, built):
    folder, _ = built["fp8-block-legacy"]
    saved, source = tensors(folder / "model.safetensors"), source_tensors(block_repo)
    args = block_args([128, 128])
    module = "model.layers.1.mlp.down_proj"
    scale = scale_from_amax(blocks.block_amax(source[f"{module}.weight"], [128, 128]), args, torch.float32)
    assert torch.equal(saved[f"{module}.weight_scale_inv"], scale)
    written = blocks.quantize_weight(source[f"{module}.weight"], scale, [128, 128])
    assert torch.equal(saved[f"{module}.weight"].view(torch.uint8), written.view(torch.uint8))


def test_a_second_build_writes_the_same_bytes(block_repo, built, tmp_path):
    for quant in ("fp8-block", "fp8-block-legacy"):
        again = build.build(block_repo.root, f"tiny-blocks-{quant}", out=tmp_path / quant, log=lambda m: None)
        assert again["content_digest"] == built[quant][1]["content_digest"]
        assert again["inputs"]["versions"]["quantize.fp8-block"] == 1


def fp8_block(**changes) -> dict:
    """The shipped fp8-block recipe as data, with changes."""
    import yaml

    quant = yaml.safe_load((conftest.PROJECT / "specs" / "quant" / "fp8-block.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(quant[key], dict):
            quant[key] = {**quant[key], **value}
        else:
            quant[key] = value
    return quant


@pytest.mark.parametrize("changes, key, words", [
    ({"algorithm": "gptq", "gptq": {"block_size": 128, "dampening_frac": 0.01, "actorder": None}},
     ("quant", "algorithm"), "rounded to nearest"),
    ({"weights": {"observer": "mse"}}, ("quant", "weights", "observer"), "max |w| per block"),
    ({"input_activations": {"strategy": "token", "group_size": None}}, ("quant", "input_activations"), "group_size 128"),
    ({"input_activations": {"strategy": "tensor", "group_size": None, "dynamic": False}},
     ("quant", "input_activations"), "dynamic true"),
    ({"weights": {"block_structure": None}}, ("quant", "weights", "block_structure"), "required with strategy block"),
    ({"weights": {"type": "int"}}, ("quant", "weights", "type"), "FP8"),
], ids=["gptq", "mse", "token-activations", "static-activations", "no-block-structure", "int"])
def test_resolve_refuses_block_recipes_it_does_not_round(changes, key, words):
    found = problems(Recipe.of(fp8_block(**changes)))
    assert any(path == key and words in message for path, message in found), found


def test_block_structure_is_refused_on_other_strategies_and_on_activations():
    grouped = fp8_block(weights={"strategy": "channel"})
    assert any(path == ("quant", "weights", "block_structure") for path, _ in problems(Recipe.of(grouped)))
    blocked = fp8_block(input_activations={"strategy": "block", "block_structure": [128, 128], "group_size": None})
    assert any(path == ("quant", "input_activations", "strategy") for path, _ in problems(Recipe.of(blocked)))


def test_the_shipped_recipes_are_consistent_and_name_their_part():
    for name in ("fp8-block", "fp8-block-legacy"):
        import yaml

        recipe = Recipe.of(yaml.safe_load((conftest.PROJECT / "specs" / "quant" / f"{name}.yaml").read_text()))
        assert problems(recipe) == []
        assert recipe.scheme_class == "w8a8-fp8-block" and "quantize.fp8-block" in recipe.parts
        assert recipe.weights.scale_count(576, 1536) == 5 * 12  # partial blocks keep a scale each
        assert recipe.weights.words() == "fp8, block 128x128, symmetric, static scales"


def test_targets_without_block_kernels_refuse_the_recipe(block_repo):
    from builder.release.resolve import resolve

    text = release_text("tiny-blocks-h100", "tiny-blocks", "fp8-block", "vllm-h100")
    (block_repo.root / "specs" / "release" / "tiny-blocks-h100.yaml").write_text(text)
    try:
        with pytest.raises(BuilderError, match="does not run w8a8-fp8-block"):
            resolve(block_repo.root, "tiny-blocks-h100")
    finally:
        (block_repo.root / "specs" / "release" / "tiny-blocks-h100.yaml").unlink()


def test_the_legacy_layout_refuses_an_fp8_kv_cache():
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False, "group_size": None}
    recipe = Recipe.of(fp8_block(format="fp8", kv_cache_scheme=kv))
    assert any(path == ("quant", "kv_cache_scheme") and "block-wise legacy" in message
               for path, message in problems(recipe))


def test_resolve_refuses_smollm2_whose_576_features_do_not_tile_into_128_blocks():
    from builder.release.resolve import resolve

    with pytest.raises(BuilderError) as refused:
        resolve(conftest.PROJECT, "smollm2-135m-instruct-fp8-dynamic", ("quant=fp8-block", "target=vllm-h200"))
    message = str(refused.value)
    assert "quant.weights.block_structure" in message and "self_attn.k_proj [192, 576]" in message
    assert "down_proj" not in message  # 1536 input features tile; its 576 rows are row-parallel, neither fused nor split
