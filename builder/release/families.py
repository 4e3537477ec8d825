"""Model families as data: what the builder must know of each architecture it supports. Pure.

    builder resolve RELEASE          # refuses an architecture class that is not listed here
    builder model add NAME PATH      # derives a model spec's architecture block with facts()

What a family's own forward computes exactly (its embedding scale, per-layer-type rotary embeddings,
sliding-window masks, softcapping, q/k norms) the builder does not restate: calibration runs the
model's own code for it (builder/quant/calibrate.py). The table holds what the builder reads itself:
where k/v scales attach, which norms absorb SmoothQuant/AWQ factors, which gates stay unquantized,
which attention kernel calibration must use, what vLLM refuses. Everything else is derived from the
model transformers builds (builder/source/skeleton.py): every Linear of the decoder layers a target
(experts included), the names on disk (transformers' own renamings and expert converters), and the
tensors a checkpoint holds (the architecture block's `checkpoint`, written by `builder model add`).
Any other decoder-only *ForCausalLM gets a row of defaults (generic()): a fact it lacks refuses only
the recipe that needs it. The eleven first families keep their hand-planned checkpoint (planned=True),
so their specs and locks keep every byte.
Adding a family: docs/models.md, "Adding a family".
"""

from dataclasses import dataclass, field

from builder import formats
from builder.formats import experts as on_disk
from builder.release import fused


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
    calibrate_with: str = "sdpa"      # attention kernel calibration runs (eager: sdpa drops softcapping; a model
    #                                   module's path: its own eager attention, derived where transformers has
    #                                   no sdpa for the model: gpt-oss's sinks, builder/source/skeleton.py)
    embedding_scale: bool = False     # input embeddings x sqrt(hidden) (a non-persistent buffer)
    norm_offset: bool = False         # RMSNorm multiplies by 1 + weight (Gemma), not by weight
    tied_only: bool = False           # vLLM loads only tied lm_head checkpoints
    moe: MoE | None = None
    vllm: str = ""                    # why the pinned vLLM has no model for it (README; empty: it has one)
    planned: bool = False             # tensors() plans the checkpoint from the block (the first eleven)
    norms_absorb: bool = False        # SMOOTHED_NORMS scale by their weight and feed only Linears (derived rows)
    unquantized: tuple = ()           # Linears in a layer that stay BF16 (gates vLLM builds unquantized)
    runtime_config: tuple = ()        # config.json keys vLLM's model code reads beyond the usual (kept as is)
    experts_on_disk: bool = False     # derived rows: one tensor per expert on disk, as vLLM's MoE loaders read
    # derived from transformers when the model is built (builder/source/skeleton.py), not written in rows
    renames: tuple = field(default=(), compare=False, repr=False)
    expert_names: tuple = field(default=(), compare=False)


MIXTRAL_MOE = MoE(block="block_sparse_moe", experts=("w1", "w3", "w2"), count=("num_local_experts",),
                  size="intermediate_size")
QWEN_MOE = MoE(block="mlp", experts=("gate_proj", "up_proj", "down_proj"),
               count=("num_experts", "num_local_experts"), size="moe_intermediate_size", sparse_step=True)
OLMOE_MOE = MoE(block="mlp", experts=("gate_proj", "up_proj", "down_proj"),
                count=("num_experts", "num_local_experts"), size="intermediate_size")

FAMILIES = {family.model_type: family for family in (
    Family("llama", ("LlamaForCausalLM",), planned=True),
    Family("mistral", ("MistralForCausalLM",), qkv_bias="never", planned=True),
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias="always", planned=True),
    Family("qwen3", ("Qwen3ForCausalLM",), qk_norm="head_dim", planned=True),
    Family("phi3", ("Phi3ForCausalLM",), attention="fused", mlp="fused", qkv_bias="never", planned=True),
    Family("gemma", ("GemmaForCausalLM",), embedding_scale=True, norm_offset=True, tied_only=True, planned=True),
    Family("gemma2", ("Gemma2ForCausalLM",), layer_norms=4, calibrate_with="eager", embedding_scale=True,
           norm_offset=True, tied_only=True, planned=True),
    Family("gemma3_text", ("Gemma3ForCausalLM",), layer_norms=4, qk_norm="head_dim", embedding_scale=True,
           norm_offset=True, tied_only=True, planned=True),
    Family("mixtral", ("MixtralForCausalLM",), qkv_bias="never", moe=MIXTRAL_MOE, planned=True),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), qk_norm="head_dim", moe=QWEN_MOE, planned=True),
    Family("olmoe", ("OlmoeForCausalLM",), qk_norm="full", moe=OLMOE_MOE, planned=True),
    # Derived families: their checkpoint, experts and names come from the model transformers builds.
    Family("granite", ("GraniteForCausalLM",), norms_absorb=True,
           runtime_config=("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")),
    Family("olmo2", ("Olmo2ForCausalLM",)),  # norms after attention and MLP: nothing to fold into
    Family("smollm3", ("SmolLM3ForCausalLM",), norms_absorb=True, runtime_config=("no_rope_layers",)),
    Family("exaone4", ("Exaone4ForCausalLM",), runtime_config=("layer_types", "sliding_window")),
    Family("cohere2", ("Cohere2ForCausalLM",), tied_only=True,  # one LayerNorm feeds attention and MLP
           runtime_config=("logit_scale", "layer_types", "sliding_window")),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), unquantized=("mlp.shared_expert_gate",), experts_on_disk=True),
    Family("ernie4_5_moe", ("Ernie4_5_MoeForCausalLM",), experts_on_disk=True),
    Family("glm4_moe", ("Glm4MoeForCausalLM",), experts_on_disk=True),
    # MLA caches a latent, not per-head keys and values: no k/v scales from k_proj/v_proj (attention None)
    Family("deepseek_v3", ("DeepseekV3ForCausalLM",), attention=None, experts_on_disk=True),
    # hybrid: linear-attention layers hold no KV cache; scales for the full-attention layers only are not written
    Family("qwen3_next", ("Qwen3NextForCausalLM",), attention=None, experts_on_disk=True,
           unquantized=("mlp.shared_expert_gate",)),
    Family("minimax", ("MiniMaxForCausalLM",), attention=None, experts_on_disk=True,
           vllm="vLLM 0.32 has no MiniMax-Text-01 model (removed in 0.23: registry.py _PREVIOUSLY_SUPPORTED_MODELS)"),
)}
BY_CLASS = {cls: family for family in FAMILIES.values() for cls in family.classes}
# The norms SmoothQuant folds its factors into: each feeds Linears only (attention's q/k/v or qkv_proj,
# the MLP's gate/up or gate_up_proj) in families whose RMSNorm scales by its weight.
SMOOTHED_NORMS = ("input_layernorm", "post_attention_layernorm")


def smoothable(family: Family) -> bool:
    """Whether SmoothQuant can fold into the family's layers: dense, two norms per layer, each
    multiplying by its weight (Gemma's 1 + weight, its extra norms, and MoE routers are not handled);
    a derived row says so itself (norms_absorb)."""
    if not family.planned:
        return family.norms_absorb
    return family.moe is None and family.layer_norms == 2 and not family.norm_offset


# Multi-token-prediction layers on disk (DeepSeek-V3, Kimi K2, GLM-4.5; vLLM's deepseek_mtp.py and
# glm4_moe_mtp.py read them so): transformers' MtpLayer names (memory prefix) -> the checkpoint's, in
# model.layers.{num_hidden_layers + k}; enorm, hnorm and eh_proj keep their names.
MTP_ON_DISK = (("mtp_block.", ""), ("post_norm.", "shared_head.norm."))

# Tensor parallelism splits these layers along their input features (vLLM's RowParallelLinear).
ROW_PARALLEL = ("self_attn.o_proj", "down_proj", "w2")


def of_class(cls: str | None) -> Family | None:
    """The family's row; a row of defaults (generic()) for any other *ForCausalLM; None otherwise."""
    if cls in BY_CLASS:
        return BY_CLASS[cls]
    return generic(cls) if isinstance(cls, str) and cls.endswith("ForCausalLM") else None


def generic(cls: str) -> Family:
    """A decoder-only model without a row: calibrated and quantized from what its model derives; the
    facts only a row gives are unknown (KV projections: attention None), so their recipes are refused."""
    return Family("", (cls,), attention=None)


def supported() -> str:
    """The classes with a row, for error messages."""
    return ", ".join(sorted(BY_CLASS))


def kv_sources(family: Family) -> dict:
    """Attention weight (path in a layer) -> the KV-cache scales its layer's k/v scales attach to."""
    if family.attention is None:
        return {}
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
    """Every tensor the checkpoint holds, by name and shape, from the architecture block alone: its
    derived `checkpoint` (builder model add wrote it from the model), or planned for the first families."""
    if arch.get("checkpoint") is not None:
        return derived_tensors(arch["checkpoint"], split=arch["class"] in fused.EXPERTS_SPLIT)
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
    cache = kv_cache(config)
    if cache is not None:
        block["kv_cache"] = cache
    if family is not None and family.moe is not None:
        count = next(config[key] for key in family.moe.count if config.get(key))
        block["moe"] = {"num_experts": count, "num_experts_per_tok": config["num_experts_per_tok"],
                        "expert_intermediate_size": config[family.moe.size],
                        "decoder_sparse_step": config.get("decoder_sparse_step") or 1,
                        "mlp_only_layers": list(config.get("mlp_only_layers") or [])}
    return block


# Roles of a checkpoint entry that are not Linears a recipe may quantize: routers, and the multi-token-
# prediction layers' tensors (passed through; their Linears and routers named in ignore, as mtp_linear).
ROLE_CLASSES = {"router": "router", "mtp": "mtp", "mtp_linear": "mtp_linear"}


# Elements of one linear-attention or Mamba layer's state per sequence, by the config keys that size it
# (vLLM's state shapes): Gated DeltaNet (Qwen3-Next) conv + recurrent state, Mamba-2 (Granite 4) conv +
# SSM state, lightning attention (MiniMax) a head_dim x head_dim state per head. The first whose keys
# the config has wins.
STATE_ELEMENTS = (
    (("linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim", "linear_value_head_dim",
      "linear_conv_kernel_dim"),
     lambda c: (2 * c["linear_num_key_heads"] * c["linear_key_head_dim"] + c["linear_num_value_heads"]
                * c["linear_value_head_dim"]) * (c["linear_conv_kernel_dim"] - 1)
     + c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"]),
    (("mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups", "mamba_d_conv", "mamba_expand"),
     lambda c: (c["mamba_expand"] * c["hidden_size"] + 2 * c["mamba_n_groups"] * c["mamba_d_state"])
     * (c["mamba_d_conv"] - 1) + c["mamba_n_heads"] * c["mamba_d_head"] * c["mamba_d_state"]),
    (("num_attention_heads", "head_dim"), lambda c: c["num_attention_heads"] * c["head_dim"] ** 2),
)
CACHED_LAYERS = {"full_attention": "full", "attention": "full", "chunked_attention": "full",
                 "sliding_attention": "sliding", "linear_attention": "state", "mamba": "state"}


def kv_cache(config: dict) -> dict | None:
    """The architecture block's kv_cache (what vLLM allocates) from a full config, or None when every layer
    caches every token's keys and values (the estimate's plain case: no existing spec changes). Layers by
    layer_types (or layers_block_type); without them every layer is sliding when sliding_window is set
    (Mistral) and use_sliding_window is not false (Qwen2); MLA caches kv_lora_rank + qk_rope_head_dim."""
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or config.get("layers_block_type")
    window = config.get("sliding_window") or None
    if isinstance(types, list) and len(types) == layers and all(t in CACHED_LAYERS for t in types):
        kinds = [CACHED_LAYERS[t] for t in types]
    elif window and config.get("use_sliding_window") is not False:
        kinds = ["sliding"] * layers
    else:
        kinds = ["full"] * layers
    if "sliding" in kinds and not window:
        kinds = ["full" if kind == "sliding" else kind for kind in kinds]
    block = {"full": kinds.count("full"), "sliding": kinds.count("sliding"), "state": kinds.count("state"),
             "state_elements": 0}
    if block["sliding"]:
        block["window"] = window
    if block["state"]:
        block["state_elements"] = next(size(config) for keys, size in STATE_ELEMENTS
                                       if all(config.get(key) for key in keys))
    if config.get("kv_lora_rank"):
        block["latent"] = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    return None if block["full"] == layers and "latent" not in block else block


def derived_tensors(entries: list, split: bool = False) -> list:
    """The tensors of an architecture block's `checkpoint`: each entry a name with {layer} and {expert}
    for the layer and expert numbers, its shape, its role (linear, expert, router, other), the layers
    it is in (null: outside the decoder layers) and the experts per layer (null: not an expert); mtp and
    mtp_linear: a multi-token-prediction layer's (source/load.py with_mtp). Fused experts count as experts
    (active for top-k of the tokens only), not as Linears; with split (fused.EXPERTS_SPLIT), as the per-expert
    Linears a quantized build writes (formats/experts.py: as many values, so a BF16 estimate is unchanged)."""
    found = []
    for entry in entries:
        role = entry["role"]
        if split and role == "fused" and on_disk.fused(entry["name"], tuple(entry["shape"])):
            found += [Tensor(f"{module}.weight", shape, linear=True, expert=True) for layer in entry["layers"]
                      for module, shape in on_disk.linears(entry["name"].replace("{layer}", str(layer)),
                                                           tuple(entry["shape"]))]
            continue
        for layer in entry["layers"] if entry.get("layers") is not None else [None]:
            for expert in range(entry["experts"]) if entry.get("experts") else [None]:
                name = entry["name"].replace("{layer}", str(layer)).replace("{expert}", str(expert))
                found.append(Tensor(name, tuple(entry["shape"]), linear=role in ("linear", "expert"),
                                    expert=role in ("expert", "fused"), cls=ROLE_CLASSES.get(role, "Linear")))
    return found


def fact_problems(arch: dict, recipe) -> list:
    """What a recipe needs of the family that its row does not give, as (key path, message): each refuses
    that recipe only (the fact, and the doc that says how to add it)."""
    family = of_class(arch["class"])
    how = "docs/models.md, \"Adding a family\", says how to add it"
    found = []
    refused = fused.refusal(arch, recipe)
    if refused:
        found.append((("quant", "weights"), f"{refused}; {how}, or build bf16"))
    if recipe.kv_cache_scheme is not None and not kv_sources(family):
        found.append((("quant", "kv_cache_scheme"), f"KV-cache scales need the fact 'attention' (which projections "
                      f"make keys and values) of {arch['class']}, which has no row in builder/release/families.py; "
                      f"{how}, or set quant.kv_cache_scheme=null"))
    return found


ROPE_KEYS = ("rope_type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")


def layout_problems(arch: dict, family: Family, layout: str) -> list:
    """A model a format written for a few families (its FAMILIES: the runtime's own model code) does
    not cover, as (key path, message)."""
    fmt = formats.of(layout)
    covered = fmt.FAMILIES
    if covered is None:
        return []
    model_type = family.model_type or arch.get("model_type")  # a family without a row: its config's
    if model_type not in covered:
        classes = sorted(cls for name in covered for cls in (FAMILIES[name].classes if name in FAMILIES
                                                              else (covered[name],)))
        return [(("model", "architecture", "class"), f"{arch['class']}: format {layout} is written for "
                 f"{', '.join(classes)}")]
    rope = arch.get("rope_parameters")
    if rope and rope["rope_type"] != "default" and getattr(fmt, "UNSCALED_ROPE_ONLY", False):
        # llama.cpp and MLX need rope_freqs / rope.scaling.* keys for these
        return [(("model", "architecture", "rope_parameters"), f"rope_type {rope['rope_type']}: format "
                 f"{layout} is written for unscaled RoPE only")]
    return []
