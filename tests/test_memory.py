"""The per-device memory estimate: exact weight bytes, KV cache split by the parallel layout."""

import pytest

from builder import build as build_module
from builder.release import memory
from builder.release.lock import read
from builder.release.recipe import Recipe
from builder.release.resolve import resolve
from builder.tensorfile import read_header
from conftest import PROJECT


def estimate(spec):
    return memory.estimate(spec, Recipe.of(spec["quant"]))


def tensor_bytes(artifact):
    return sum(info["data_offsets"][1] - info["data_offsets"][0]
               for file in artifact.glob("*.safetensors") for info in read_header(file).values())


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-mistral"])  # no biases: the estimate counts none
@pytest.mark.parametrize("recipe", ["bf16", "fp8-dynamic"])
def test_weight_estimate_equals_the_bytes_the_build_writes(tiny_repo, kind, recipe, tmp_path):
    release = f"{kind}-{recipe}"
    build_module.build(tiny_repo.root, release, out=tmp_path / "a", log=lambda message: None)
    spec = resolve(tiny_repo.root, release)
    assert memory.weight_bytes(spec["model"]["architecture"], Recipe.of(spec["quant"])) == tensor_bytes(tmp_path / "a")


def test_smollm2_estimates_match_its_checkpoint_sizes():
    # 134,515,008 parameters x 2 B; FP8 halves the 30 x 7 projections and adds one BF16 scale per row
    bf16 = read(PROJECT, "smollm2-135m-instruct-bf16")["spec"]
    fp8 = read(PROJECT, "smollm2-135m-instruct-fp8-dynamic")["spec"]
    assert memory.weight_bytes(bf16["model"]["architecture"], Recipe.of(bf16["quant"])) == 269_030_016
    assert memory.weight_bytes(fp8["model"]["architecture"], Recipe.of(fp8["quant"])) == 163_172_736


def test_kv_cache_is_split_by_tensor_and_pipeline_degree():
    tp3 = estimate(read(PROJECT, "smollm2-135m-instruct-fp8-dynamic-l4-tp3")["spec"])
    pp2 = estimate(read(PROJECT, "smollm2-135m-instruct-bf16-a100-pp2")["spec"])
    # 2 (K, V) x layers x KV heads x 64 head_dim x 2 B x 8192 tokens x 16 sequences
    assert (tp3["layers_per_device"], tp3["kv_heads_per_device"]) == (30, 1)
    assert tp3["kv_cache_per_device"] == 2 * 30 * 1 * 64 * 2 * 8192 * 16
    assert tp3["weights_per_device"] == -(-163_172_736 // 3)
    assert (pp2["layers_per_device"], pp2["kv_heads_per_device"]) == (15, 3)
    assert pp2["kv_cache_per_device"] == 2 * 15 * 3 * 64 * 2 * 8192 * 16
    assert pp2["weights_per_device"] == 269_030_016 // 2


def test_an_fp8_kv_cache_halves_the_cache_bytes():
    spec = read(PROJECT, "smollm2-135m-instruct-bf16")["spec"]
    plain = estimate(spec)
    spec["quant"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                        "symmetric": True, "dynamic": False, "group_size": None}
    quantized = estimate(spec)
    assert quantized["kv_cache_dtype"] == "fp8"
    assert quantized["kv_cache_per_device"] * 2 == plain["kv_cache_per_device"]


def test_int4_group_weights_count_packed_nibbles_and_one_scale_per_group():
    arch = {"class": "LlamaForCausalLM", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 100, "tie_word_embeddings": True}
    quant = Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "rtn", "gptq": None,
                       "targets": ["Linear"], "ignore": [], "input_activations": None, "kv_cache_scheme": None,
                       "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64,
                                   "symmetric": True, "dynamic": False}})
    linears = [(256, 256)] * 4 + [(512, 256)] * 2 + [(256, 512)]
    expected = (100 + 3) * 256 * 2 + sum(rows * cols // 2 + rows * (cols // 64) * 2 for rows, cols in linears)
    assert memory.weight_bytes(arch, quant) == expected
