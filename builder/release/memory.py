"""Per-device memory of a release (weights share + KV cache), from the model spec's architecture. Pure.

    builder resolve RELEASE    # refuses a release whose estimate exceeds the target's usable memory
"""

from builder.release import families, fused
from builder.release.families import head_dim
from builder.release.recipe import Recipe

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_CACHE_BYTES = {"fp8": 1}  # bytes per cached element; "auto" means the model's dtype
GIB = 1 << 30


def checkpoint(arch: dict) -> list:
    """Every tensor of the model's checkpoint (builder/release/families.py), from its architecture block."""
    return families.tensors(arch, families.of_class(arch["class"]))


def linear_layers(arch: dict) -> list:
    """(module name, out_features, in_features) of every Linear whose weight the checkpoint holds,
    every expert of a MoE layer included (a tied lm_head has no tensor of its own)."""
    return [(t.name[: -len(".weight")], *t.shape) for t in checkpoint(arch) if t.linear]


def weight_bytes(arch: dict, recipe: Recipe) -> int:
    """Bytes of every tensor the artifact holds (headers and per-tensor scalars aside): quantized
    weights at num_bits with one scale (and, asymmetric, one bias) per tensor, row, group or block, in
    the recipe's scale_dtype (one byte: NVFP4's E4M3, MX's E8M0) or else the output dtype; the rest in
    the output dtype."""
    element, total = DTYPE_BYTES[recipe.dtype], 0
    kept_fused = recipe.weights is not None and fused.kept_fused(arch["class"], recipe.format)
    for tensor in checkpoint(arch):
        count = 1
        for size in tensor.shape:
            count *= size
        module = tensor.name[: -len(".weight")]
        if kept_fused and tensor.expert:  # gpt-oss's experts in its MXFP4 (fused, counted per expert): E8M0 bytes
            total += count * recipe.weights.num_bits // 8 + count // recipe.weights.group_size
        elif tensor.linear and recipe.quantizes(module, tensor.cls):
            rows, columns = tensor.shape
            scale = 1 if recipe.weights.scale_dtype else element  # float8_e4m3fn and uint8 are one byte each
            per_scale = scale if recipe.weights.symmetric else 2 * scale  # asymmetric: a bias per scale too
            total += count * recipe.weights.num_bits // 8 + recipe.weights.scale_count(rows, columns) * per_scale
        else:
            total += count * element
    return total


def parameters(arch: dict) -> dict:
    """{"total": parameters, "active": parameters a token runs through} (MoE: top-k of the experts), and
    "mtp": those of the multi-token-prediction layers (in total, not active: only speculative decoding
    runs them) when the checkpoint holds any."""
    total = active = mtp = 0
    moe = arch.get("moe")
    share = moe["num_experts_per_tok"] / moe["num_experts"] if moe else 1
    for tensor in checkpoint(arch):
        count = 1
        for size in tensor.shape:
            count *= size
        total += count
        if tensor.cls in ("mtp", "mtp_linear"):
            mtp += count
        else:
            active += count * share if tensor.expert else count
    return {"total": total, "active": round(active), **({"mtp": mtp} if mtp else {})}


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
    figures = {"weights_bytes": weights, "weights_per_device": weights_share, "kv_cache_per_device": kv,
               "per_device": weights_share + kv, "usable_bytes": usable, "kv_cache_dtype": kv_dtype,
               "kv_element_bytes": kv_element, "layers_per_device": layers, "kv_heads_per_device": kv_heads,
               "tensor": tp, "pipeline": pp}
    if arch.get("kv_cache"):
        figures.update(layered_cache(arch, recipe, context, tp, pp, kv_element, kv_heads))
        figures["per_device"] = weights_share + figures["kv_cache_per_device"]
    return figures


def layered_cache(arch: dict, recipe: Recipe, context: dict, tp: int, pp: int, kv_element: int,
                  kv_heads: int) -> dict:
    """The cache of an architecture whose layers differ (its kv_cache block): full-attention layers hold
    max_model_len tokens, sliding ones at most the window, MLA one latent per token and layer (every head
    reads it, so tensor parallelism does not split it: vLLM keeps it whole on each rank), linear-attention
    and Mamba layers a fixed state per sequence (split over TP, in the model's dtype: an FP8 KV cache does
    not quantize it), per sequence times max_num_seqs; the busiest pipeline stage holds ceil(n / PP) of each."""
    block, tokens, seqs = arch["kv_cache"], context["max_model_len"], context["max_num_seqs"]
    full, sliding, state = (-(-block[kind] // pp) for kind in ("full", "sliding", "state"))
    per_token = block["latent"] * kv_element if block.get("latent") else 2 * kv_heads * head_dim(arch) * kv_element
    window = min(block.get("window") or tokens, tokens)
    state_bytes = -(-block["state_elements"] // tp) * DTYPE_BYTES[recipe.dtype]
    kv = per_token * (full * tokens + sliding * window) * seqs + state * state_bytes * seqs
    return {"kv_cache_per_device": kv, "cache_layers": (full, sliding, state), "cache_token_bytes": per_token,
            "cache_window": window, "cache_state_bytes": state_bytes}


def arithmetic(spec: dict, figures: dict) -> str:
    """The estimate written out: every factor, so a reader can check it by hand."""
    arch, context = spec["model"]["architecture"], spec["context"]
    target = spec["target"]
    kv_name = figures["kv_cache_dtype"] if figures["kv_cache_dtype"] != "auto" else spec["quant"]["dtype"]
    if "cache_layers" in figures:
        cache = layered_arithmetic(arch, context, figures, kv_name, spec["quant"]["dtype"])
    else:
        cache = (f"KV cache 2 (K, V) x {figures['layers_per_device']} layers"
                 f" x {figures['kv_heads_per_device']} KV heads x {head_dim(arch)} head_dim"
                 f" x {figures['kv_element_bytes']} B ({kv_name}) x {context['max_model_len']:,} tokens"
                 f" x {context['max_num_seqs']} sequences = {figures['kv_cache_per_device']:,} B")
    return (f"weights {figures['weights_bytes']:,} B / (TP {figures['tensor']} x PP {figures['pipeline']})"
            f" = {figures['weights_per_device']:,} B; {cache};"
            f" total {figures['per_device']:,} B ({figures['per_device'] / GIB:.2f} GiB) per device;"
            f" usable {target['memory_utilization']} x {target['device']['memory_bytes']:,} B"
            f" = {figures['usable_bytes']:,} B ({figures['usable_bytes'] / GIB:.2f} GiB)")


def layered_arithmetic(arch: dict, context: dict, figures: dict, kv_name: str, dtype: str) -> str:
    """The cache of layered_cache() written out."""
    full, sliding, state = figures["cache_layers"]
    block, per_token = arch["kv_cache"], figures["cache_token_bytes"]
    token = (f"{block['latent']} latent values (kv_lora_rank + qk_rope_head_dim)" if block.get("latent") else
             f"2 (K, V) x {figures['kv_heads_per_device']} KV heads x {head_dim(arch)} head_dim")
    parts = [f"({token} x {figures['kv_element_bytes']} B ({kv_name}) = {per_token:,} B per token and layer)"
             f" x ({full} full-attention layers x {context['max_model_len']:,} tokens"
             + (f" + {sliding} sliding layers x {figures['cache_window']:,} tokens" if sliding else "") + ")"]
    if state:
        parts.append(f"{state} linear-attention/Mamba layers x {figures['cache_state_bytes']:,} B of state"
                     f" ({dtype}, per TP shard)")
    return (f"KV cache [{' + '.join(parts)}] x {context['max_num_seqs']} sequences"
            f" = {figures['kv_cache_per_device']:,} B")
