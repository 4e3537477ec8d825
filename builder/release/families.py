"""Model families as data: what the builder must know of each architecture it supports. Pure.

    builder resolve RELEASE          # refuses an architecture class that is not listed here
    builder model add NAME PATH      # derives a model spec's architecture block with facts()

What a family's own forward computes exactly (its embedding scale, per-layer-type rotary embeddings,
sliding-window masks, softcapping, q/k norms) the builder does not restate: calibration runs the
model's own code for it (builder/quant/calibrate.py). The table holds what the builder reads itself:
checkpoint names (fused projections, MoE experts on disk), where k/v scales attach, which attention
kernel calibration must use, what vLLM refuses, and the tensors a checkpoint holds (memory estimates).
Adding a family: docs/architecture.md, "Adding a model family".
"""

from dataclasses import dataclass, field

from builder import formats


@dataclass(frozen=True)
class MoE:
    """How a family's mixture-of-experts block is laid out on disk (transformers 5 fuses experts in
    memory; checkpoints, vLLM and llm-compressor keep one 2-D weight per expert)."""

    block: str                 # the block's path in a decoder layer on disk: mlp, block_sparse_moe
    experts: tuple             # names of an expert's gate, up and down Linears on disk
    count: tuple               # config keys for the number of experts, first present wins
    size: str                  # config key of an expert's intermediate size
    sparse_step: bool = False  # layers follow decoder_sparse_step / mlp_only_layers (Qwen-MoE)

    @property
    def router(self) -> str:
        return f"{self.block}.gate"


@dataclass(frozen=True)
class Family:
    """One transformers model_type."""

    model_type: str
    classes: tuple
    attention: str = "separate"       # q/k/v projections: separate, or fused into self_attn.qkv_proj
    mlp: str = "gated"                # gate/up/down, or fused gate_up_proj (gate rows first)
    layer_norms: int = 2              # hidden-size norm vectors per decoder layer
    qk_norm: str | None = None        # q_norm/k_norm over head_dim, or over the full width (full)
    qkv_bias: str = "config"          # biases of q/k/v: config (attention_bias), always, never
    calibrate_with: str = "sdpa"      # attention kernel calibration runs (eager: sdpa drops softcapping)
    embedding_scale: bool = False     # input embeddings x sqrt(hidden) (a non-persistent buffer)
    norm_offset: bool = False         # RMSNorm multiplies by 1 + weight (Gemma), not by weight
    tied_only: bool = False           # vLLM loads only tied lm_head checkpoints
    moe: MoE | None = None
    vllm: str = ""                    # what vLLM's CPU build on AVX2 does with it, for the README


MIXTRAL_MOE = MoE(block="block_sparse_moe", experts=("w1", "w3", "w2"), count=("num_local_experts",),
                  size="intermediate_size")
QWEN_MOE = MoE(block="mlp", experts=("gate_proj", "up_proj", "down_proj"),
               count=("num_experts", "num_local_experts"), size="moe_intermediate_size", sparse_step=True)
OLMOE_MOE = MoE(block="mlp", experts=("gate_proj", "up_proj", "down_proj"),
                count=("num_experts", "num_local_experts"), size="intermediate_size")

FAMILIES = {family.model_type: family for family in (
    Family("llama", ("LlamaForCausalLM",)),
    Family("mistral", ("MistralForCausalLM",), qkv_bias="never"),
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias="always"),
    Family("qwen3", ("Qwen3ForCausalLM",), qk_norm="head_dim"),
    Family("phi3", ("Phi3ForCausalLM",), attention="fused", mlp="fused", qkv_bias="never"),
    Family("gemma", ("GemmaForCausalLM",), embedding_scale=True, norm_offset=True, tied_only=True),
    Family("gemma2", ("Gemma2ForCausalLM",), layer_norms=4, calibrate_with="eager", embedding_scale=True,
           norm_offset=True, tied_only=True),
    Family("gemma3_text", ("Gemma3ForCausalLM",), layer_norms=4, qk_norm="head_dim", embedding_scale=True,
           norm_offset=True, tied_only=True),
    Family("mixtral", ("MixtralForCausalLM",), qkv_bias="never", moe=MIXTRAL_MOE),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), qk_norm="head_dim", moe=QWEN_MOE),
    Family("olmoe", ("OlmoeForCausalLM",), qk_norm="full", moe=OLMOE_MOE),
)}
BY_CLASS = {cls: family for family in FAMILIES.values() for cls in family.classes}
# The norms SmoothQuant folds its factors into: each feeds Linears only (attention's q/k/v or qkv_proj,
# the MLP's gate/up or gate_up_proj) in families whose RMSNorm scales by its weight.
SMOOTHED_NORMS = ("input_layernorm", "post_attention_layernorm")


def smoothable(family: Family) -> bool:
    """Whether SmoothQuant can fold into the family's layers: dense, two norms per layer, each
    multiplying by its weight (Gemma's 1 + weight, its extra norms, and MoE routers are not handled)."""
    return family.moe is None and family.layer_norms == 2 and not family.norm_offset


# Tensor parallelism splits these layers along their input features (vLLM's RowParallelLinear).
ROW_PARALLEL = ("self_attn.o_proj", "down_proj", "w2")


def of_class(cls: str) -> Family | None:
    return BY_CLASS.get(cls)


def supported() -> str:
    """The supported classes, for error messages."""
    return ", ".join(sorted(BY_CLASS))


def kv_sources(family: Family) -> dict:
    """Attention weight (path in a layer) -> the KV-cache scales its layer's k/v scales attach to."""
    if family.attention == "fused":
        return {"self_attn.qkv_proj": ("self_attn.k_scale", "self_attn.v_scale")}
    return {"self_attn.k_proj": ("self_attn.k_scale",), "self_attn.v_proj": ("self_attn.v_scale",)}


def experts(arch: dict) -> int:
    return arch["moe"]["num_experts"] if arch.get("moe") else 0


def moe_layer(arch: dict, family: Family, index: int) -> bool:
    """Whether decoder layer index holds experts (Qwen-MoE may keep some layers dense)."""
    moe = arch.get("moe")
    if not moe:
        return False
    if family.moe.sparse_step:
        return index not in moe["mlp_only_layers"] and (index + 1) % moe["decoder_sparse_step"] == 0
    return True


def head_dim(arch: dict) -> int:
    return arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]


@dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint, planned from the architecture: for memory estimates and checks."""

    name: str              # checkpoint name
    shape: tuple
    linear: bool = False   # the weight of a Linear layer (what a recipe may quantize)
    expert: bool = False   # one expert's weight (active for top-k of the tokens only)
    cls: str = field(default="Linear", compare=False)


def tensors(arch: dict, family: Family) -> list:
    """Every tensor the checkpoint holds, by name and shape, from the architecture block alone."""
    hidden, heads, kv_heads = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    dim = head_dim(arch)
    q, kv = heads * dim, kv_heads * dim
    found = [Tensor("model.embed_tokens.weight", (arch["vocab_size"], hidden)), Tensor("model.norm.weight", (hidden,))]
    if not arch["tie_word_embeddings"]:
        found.append(Tensor("lm_head.weight", (arch["vocab_size"], hidden), linear=True))
    for index in range(arch["num_hidden_layers"]):
        found.extend(layer_tensors(arch, family, f"model.layers.{index}.", index, hidden, q, kv, dim))
    return found


def layer_tensors(arch: dict, family: Family, prefix: str, index: int, hidden: int, q: int, kv: int,
                  dim: int) -> list:
    """The tensors of decoder layer index: norms, attention, then the dense MLP or the experts."""
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    found = [Tensor(f"{prefix}{name}.weight", (hidden,)) for name in
             ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm")[:family.layer_norms]]
    attention_bias = bool(arch.get("attention_bias")) and family.qkv_bias == "config"
    qkv_bias = family.qkv_bias == "always" or attention_bias
    projections = [("qkv_proj", q + 2 * kv)] if family.attention == "fused" else \
        [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    linears = [(f"{attn}{name}", rows, hidden, qkv_bias) for name, rows in projections]
    linears.append((f"{attn}o_proj", hidden, q, attention_bias))
    if moe_layer(arch, family, index):
        block, size = prefix + family.moe.block, arch["moe"]["expert_intermediate_size"]
        gate, up, down = family.moe.experts
        found.append(Tensor(f"{block}.gate.weight", (arch["moe"]["num_experts"], hidden), cls="router"))
        for expert in range(arch["moe"]["num_experts"]):
            stem = f"{block}.experts.{expert}."
            found += [Tensor(f"{stem}{gate}.weight", (size, hidden), linear=True, expert=True),
                      Tensor(f"{stem}{up}.weight", (size, hidden), linear=True, expert=True),
                      Tensor(f"{stem}{down}.weight", (hidden, size), linear=True, expert=True)]
    else:
        size, bias = arch["intermediate_size"], bool(arch.get("mlp_bias"))
        ups = [("gate_up_proj", 2 * size)] if family.mlp == "fused" else [("gate_proj", size), ("up_proj", size)]
        linears += [(f"{mlp}{name}", rows, hidden, bias) for name, rows in ups]
        linears.append((f"{mlp}down_proj", hidden, size, bias))
    for name, rows, columns, bias in linears:
        found.append(Tensor(f"{name}.weight", (rows, columns), linear=True))
        if bias:
            found.append(Tensor(f"{name}.bias", (rows,)))
    if family.qk_norm:
        sizes = (dim, dim) if family.qk_norm == "head_dim" else (q, kv)
        found += [Tensor(f"{attn}q_norm.weight", (sizes[0],)), Tensor(f"{attn}k_norm.weight", (sizes[1],))]
    return found


def facts(config: dict) -> dict:
    """A model spec's architecture block from a full config (transformers' config.to_dict(), defaults
    included): what `builder model add` writes and what a build holds config.json to."""
    family = of_class((config.get("architectures") or [None])[0])
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "max_position_embeddings", "tie_word_embeddings")
    block = {"class": config["architectures"][0], **{key: config[key] for key in keys}}
    block["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    block["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            block[key] = True
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer type (Gemma 3): the global one limits context
        rope = rope["full_attention"]
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        block["rope_parameters"] = {k: v for k, v in rope.items() if k in ROPE_KEYS and v is not None}
    if family is not None and family.moe is not None:
        count = next(config[key] for key in family.moe.count if config.get(key))
        block["moe"] = {"num_experts": count, "num_experts_per_tok": config["num_experts_per_tok"],
                        "expert_intermediate_size": config[family.moe.size],
                        "decoder_sparse_step": config.get("decoder_sparse_step") or 1,
                        "mlp_only_layers": list(config.get("mlp_only_layers") or [])}
    return block


ROPE_KEYS = ("rope_type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")


def layout_problems(arch: dict, family: Family, layout: str) -> list:
    """A model a format written for a few families (its FAMILIES: the runtime's own model code) does
    not cover, as (key path, message)."""
    covered = formats.of(layout).FAMILIES
    if covered is None:
        return []
    if family.model_type not in covered:
        classes = sorted(cls for model_type in covered for cls in FAMILIES[model_type].classes)
        return [(("model", "architecture", "class"), f"{arch['class']}: format {layout} is written for "
                 f"{', '.join(classes)}")]
    rope = arch.get("rope_parameters")
    if rope and rope["rope_type"] != "default":  # llama.cpp needs rope_freqs / rope.scaling.* keys for these
        return [(("model", "architecture", "rope_parameters"), f"rope_type {rope['rope_type']}: format "
                 f"{layout} is written for unscaled RoPE only")]
    return []
