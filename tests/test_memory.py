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


@pytest.mark.parametrize("quant", ["nvfp4a16", "mxfp4a16", "mxfp8"])
def test_fp4_and_mx_estimates_count_their_one_byte_group_scales(tiny_repo, quant, tmp_path):
    # E4M3 (NVFP4) and E8M0 (MX) scales are one byte each, not the output dtype's two (release-files 4)
    overrides = (f"quant={quant}", "target=vllm-b200")  # a target that runs the format
    build_module.build(tiny_repo.root, "tiny-llama-bf16", overrides, out=tmp_path / "a", log=lambda m: None)
    spec = resolve(tiny_repo.root, "tiny-llama-bf16", overrides)
    header = [info for file in (tmp_path / "a").glob("*.safetensors") for info in read_header(file).values()]
    assert any(info["dtype"] in ("F8_E4M3", "U8") and len(info["shape"]) == 2 and info["shape"][1] > 1
               for info in header)  # group scales were written, one byte each
    written = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header
                  if info["shape"] != [1])  # NVFP4's per-tensor global scales aside, as the estimate says
    assert memory.weight_bytes(spec["model"]["architecture"], Recipe.of(spec["quant"])) == written


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


def tiny_spec(model_type: str, extra: dict, tensor: int = 1) -> dict:
    """The shipped SmolLM2 bf16 spec with a tiny config's architecture block (what builder model add writes)."""
    import transformers

    from builder.release import families
    from conftest import SHAPE

    config = transformers.AutoConfig.for_model(model_type, **{**SHAPE, **extra}).to_dict()
    config["architectures"] = ["TinyForCausalLM"]
    spec = read(PROJECT, "smollm2-135m-instruct-bf16")["spec"]
    spec["model"]["architecture"] = {**families.facts(config), "checkpoint": []}  # no weights: the cache only
    spec["parallelism"]["tensor"] = tensor
    return spec


def test_mla_caches_one_latent_per_token_and_layer_whole_on_every_tensor_parallel_rank():
    from conftest import DERIVED

    for tensor in (1, 2):
        spec = tiny_spec(*DERIVED["tiny-deepseek-v3"], tensor=tensor)
        tokens, sequences = spec["context"]["max_model_len"], spec["context"]["max_num_seqs"]
        figures = estimate(spec)
        # kv_lora_rank 32 + qk_rope_head_dim 8 values, BF16, in each of the 2 layers, not split by TP
        assert figures["kv_cache_per_device"] == (32 + 8) * 2 * 2 * tokens * sequences
        assert "40 latent values (kv_lora_rank + qk_rope_head_dim)" in memory.arithmetic(spec, figures)


def test_hybrid_layers_cache_keys_only_in_full_attention_and_hold_a_fixed_state_in_the_others():
    from conftest import DERIVED

    spec = tiny_spec(*DERIVED["tiny-qwen3-next"])  # layer_types: linear_attention, full_attention
    tokens, sequences = spec["context"]["max_model_len"], spec["context"]["max_num_seqs"]
    keys = 2 * 2 * 16 * 2  # K and V x 2 KV heads x head_dim 16 x 2 B
    # Gated DeltaNet: conv state (2 x 2 key heads x 16 + 4 value heads x 16) x (kernel 4 - 1), recurrent 4 x 16 x 16
    state = ((2 * 2 * 16 + 4 * 16) * 3 + 4 * 16 * 16) * 2
    assert estimate(spec)["kv_cache_per_device"] == keys * 1 * tokens * sequences + 1 * state * sequences
    halved = estimate(tiny_spec(*DERIVED["tiny-qwen3-next"], tensor=2))  # heads and state split over TP 2
    assert halved["kv_cache_per_device"] == keys // 2 * tokens * sequences + state // 2 * sequences

    spec = tiny_spec(*DERIVED["tiny-minimax"])  # lightning attention: a head_dim x head_dim state per head
    assert estimate(spec)["kv_cache_per_device"] == keys * tokens * sequences + 4 * 16 * 16 * 2 * sequences

    spec = tiny_spec("granitemoehybrid", dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32,
                                              mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2))
    # Mamba-2: conv state (2 x hidden 64 + 2 x 1 group x 16) x (4 - 1), SSM state 4 heads x 32 x 16
    state = ((2 * 64 + 2 * 16) * 3 + 4 * 32 * 16) * 2
    figures = estimate(spec)
    assert figures["kv_cache_per_device"] == keys * tokens * sequences + state * sequences
    assert "1 linear-attention/Mamba layers x 5,056 B of state" in memory.arithmetic(spec, figures)


def test_sliding_window_layers_cache_at_most_the_window():
    from conftest import FAMILIES

    spec = tiny_spec(*FAMILIES["tiny-gemma2"])  # sliding_attention, full_attention; window 8
    tokens, sequences = spec["context"]["max_model_len"], spec["context"]["max_num_seqs"]
    figures = estimate(spec)
    assert figures["kv_cache_per_device"] == 2 * 2 * 16 * 2 * (tokens + 8) * sequences
    assert "1 sliding layers x 8 tokens" in memory.arithmetic(spec, figures)
    mistral = tiny_spec("mistral", dict(sliding_window=16))  # no layer_types: every layer slides
    assert estimate(mistral)["kv_cache_per_device"] == 2 * 2 * 16 * 2 * 2 * 16 * sequences


def test_every_layer_caching_every_token_keeps_the_plain_estimate_and_no_kv_cache_block():
    from conftest import DERIVED

    for model_type, extra in (("llama", {}), ("qwen2", {}), DERIVED["tiny-qwen2-moe"], ("mistral", {"sliding_window": None})):
        spec = tiny_spec(model_type, extra)
        assert "kv_cache" not in spec["model"]["architecture"]
        tokens, sequences = spec["context"]["max_model_len"], spec["context"]["max_num_seqs"]
        assert estimate(spec)["kv_cache_per_device"] == 2 * 2 * 2 * 16 * 2 * tokens * sequences
