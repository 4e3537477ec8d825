"""Per-device memory of a release (weights share + KV cache), from the model spec's architecture. Pure.

    builder resolve RELEASE    # refuses a release whose estimate exceeds the target's usable memory
"""

from builder.spec.recipe import Recipe

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_CACHE_BYTES = {"fp8": 1}  # bytes per cached element; "auto" means the model's dtype
# Projections of a Llama-style decoder layer: (module path, out_features, in_features) in units of
# (hidden, intermediate, query width q = heads x head_dim, key/value width kv = KV heads x head_dim).
DECODER_LINEARS = (
    ("self_attn.q_proj", "q", "hidden"), ("self_attn.k_proj", "kv", "hidden"),
    ("self_attn.v_proj", "kv", "hidden"), ("self_attn.o_proj", "hidden", "q"),
    ("mlp.gate_proj", "intermediate", "hidden"), ("mlp.up_proj", "intermediate", "hidden"),
    ("mlp.down_proj", "hidden", "intermediate"),
)
# Tensor parallelism splits these layers along their input features (vLLM's RowParallelLinear).
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
GIB = 1 << 30


def head_dim(arch: dict) -> int:
    return arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]


def widths(arch: dict) -> dict:
    return {"hidden": arch["hidden_size"], "intermediate": arch["intermediate_size"],
            "q": arch["num_attention_heads"] * head_dim(arch),
            "kv": arch["num_key_value_heads"] * head_dim(arch)}


def linear_layers(arch: dict) -> list:
    """(module name, out_features, in_features) of every Linear whose weight the checkpoint holds."""
    size = widths(arch)
    layers = [(f"model.layers.{index}.{path}", size[rows], size[columns])
              for index in range(arch["num_hidden_layers"]) for path, rows, columns in DECODER_LINEARS]
    if not arch["tie_word_embeddings"]:  # tied: lm_head reuses the embedding, no tensor of its own
        layers.append(("lm_head", arch["vocab_size"], arch["hidden_size"]))
    return layers


def weight_bytes(arch: dict, recipe: Recipe) -> int:
    """Bytes of every tensor the artifact holds (headers and per-tensor scalars aside)."""
    element = DTYPE_BYTES[recipe.dtype]
    # embeddings, two norms per layer and the final norm stay in the output dtype
    total = (arch["vocab_size"] + 2 * arch["num_hidden_layers"] + 1) * arch["hidden_size"] * element
    for module, rows, columns in linear_layers(arch):
        if not recipe.quantizes(module):
            total += rows * columns * element
            continue
        args = recipe.weights
        total += rows * columns * args.num_bits // 8 + args.scale_count(rows, columns) * element
    return total


def estimate(spec: dict, recipe: Recipe) -> dict:
    """Per-device bytes: weights / (TP x PP) + KV cache for max_num_seqs sequences at max_model_len.

    Returns every factor, so a message can show the arithmetic.
    """
    arch, context = spec["model"]["architecture"], spec["context"]
    tp, pp = spec["parallelism"]["tensor"], spec["parallelism"]["pipeline"]
    kv_dtype = recipe.kv_cache_dtype
    kv_element = KV_CACHE_BYTES.get(kv_dtype, DTYPE_BYTES[recipe.dtype])
    layers = -(-arch["num_hidden_layers"] // pp)        # layers on the busiest pipeline stage
    kv_heads = -(-arch["num_key_value_heads"] // tp)    # KV heads per tensor-parallel shard
    weights = weight_bytes(arch, recipe)
    weights_share = -(-weights // (tp * pp))
    kv = (2 * layers * kv_heads * head_dim(arch) * kv_element  # K and V, bytes per token
          * context["max_model_len"] * context["max_num_seqs"])
    device = spec["target"]["device"]
    usable = int(device["memory_bytes"] * spec["target"]["memory_utilization"])
    return {"weights_bytes": weights, "weights_per_device": weights_share, "kv_cache_per_device": kv,
            "per_device": weights_share + kv, "usable_bytes": usable, "kv_cache_dtype": kv_dtype,
            "kv_element_bytes": kv_element, "layers_per_device": layers, "kv_heads_per_device": kv_heads,
            "tensor": tp, "pipeline": pp}


def arithmetic(spec: dict, figures: dict) -> str:
    """The estimate written out: every factor, so a reader can check it by hand."""
    arch, context = spec["model"]["architecture"], spec["context"]
    target = spec["target"]
    kv_name = figures["kv_cache_dtype"] if figures["kv_cache_dtype"] != "auto" else spec["quant"]["dtype"]
    return (f"weights {figures['weights_bytes']:,} B / (TP {figures['tensor']} x PP {figures['pipeline']})"
            f" = {figures['weights_per_device']:,} B; KV cache 2 (K, V) x {figures['layers_per_device']} layers"
            f" x {figures['kv_heads_per_device']} KV heads x {head_dim(arch)} head_dim"
            f" x {figures['kv_element_bytes']} B ({kv_name}) x {context['max_model_len']:,} tokens"
            f" x {context['max_num_seqs']} sequences = {figures['kv_cache_per_device']:,} B;"
            f" total {figures['per_device']:,} B ({figures['per_device'] / GIB:.2f} GiB) per device;"
            f" usable {target['memory_utilization']} x {target['device']['memory_bytes']:,} B"
            f" = {figures['usable_bytes']:,} B ({figures['usable_bytes'] / GIB:.2f} GiB)")
