"""llama-quantize's per-tensor type mix for its Q4_K_M and Q5_K_M presets (llama_tensor_get_type in
llama.cpp's src/llama-quant.cpp), as data and one function: which ggml type each GGUF tensor gets.

    kmix.tensor_type("Q4_K_M", "blk.0.attn_v.weight", 0, 30, 576, tied=True)   # -> "Q8_0"

What llama.cpp decides, for a dense decoder (not Falcon, not a 70B Llama, no experts, no --pure, no
--tensor-type / --output-tensor-type / --token-embedding-type overrides):
- output.weight gets Q6_K; so does token_embd.weight when the embeddings are tied (the file has no
  output.weight). Either gets Q8_0 instead when its rows are not a multiple of 256 values.
- attn_v (and the fused attn_qkv, and attn_kv_b) and ffn_down get Q6_K on the "more bits" layers: the
  first and last eighth of the layers and every third layer between them (use_more_bits); every other
  quantized tensor gets the preset's type, Q4_K or Q5_K.
- A tensor whose rows (ne[0], the input features) are not a multiple of 256 falls back to a type with
  blocks of 32 (tensor_type_fallback): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; to F16 when the rows are
  not a multiple of 32 either. SmolLM2-135M (hidden size 576 = 2.25 x 256, intermediate 1536 = 6 x 256)
  therefore keeps K-quants only in ffn_down; attn_q/k/v/output and ffn_gate/up take Q5_0 (Q4_K_M) or
  Q5_1 (Q5_K_M), attn_v on more-bits layers and the tied token_embd take Q8_0.
- 1-D tensors (norms, biases) are never quantized; nor are the 2-D ones named in UNQUANTIZED.
"""

PRESETS = {  # llama_ftype_get_default_type and the Q4_K_M / Q5_K_M branches of llama_tensor_get_type_impl
    "Q4_K_M": {"default": "Q4_K", "more_bits": "Q6_K", "file_type": 15},
    "Q5_K_M": {"default": "Q5_K", "more_bits": "Q6_K", "file_type": 17},  # file_type: general.file_type
}
OUTPUT_TYPE = "Q6_K"          # output.weight, and token_embd.weight when tied
OUTPUT_FALLBACK = "Q8_0"      # ... when its rows are not a multiple of the preset type's block
BLOCK_VALUES = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback, block 256 -> 32
# tensor_get_category: the first rule whose text the name holds (exact names for the first two)
CATEGORIES = (("output", "output.weight", True), ("token_embd", "token_embd.weight", True),
              ("token_embd", "per_layer_token_embd.weight", True), ("attn_v", "attn_qkv.weight", False),
              ("attn_v", "attn_kv_b.weight", False), ("attn_v", "attn_v.weight", False),
              ("attn_k", "attn_k.weight", False), ("attn_q", "attn_q.weight", False),
              ("attn_output", "attn_output.weight", False), ("ffn_up", "ffn_up", False),
              ("ffn_gate", "ffn_gate", False), ("ffn_down", "ffn_down", False))
MORE_BITS_CATEGORIES = ("attn_v", "ffn_down")
# tensor_allows_quantization: 2-D weights a decoder has that llama.cpp still keeps as they are
UNQUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight",
               "ssm_conv1d", "attn_rel_b.weight", "rope_freqs.weight")


def category(name: str) -> str:
    """tensor_get_category: output, token_embd, attn_v (also attn_qkv, attn_kv_b), attn_k, attn_q,
    attn_output, ffn_up, ffn_gate, ffn_down, or other."""
    for found, text, exact in CATEGORIES:
        if name == text if exact else text in name:
            return found
    return "other"


def more_bits(layer: int, layers: int) -> bool:
    """use_more_bits: the first and last eighth of the layers, and every third layer between them."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def quantized(name: str) -> bool:
    """Whether llama-quantize quantizes this (2-D) tensor at all."""
    return name.endswith("weight") and not any(text in name for text in UNQUANTIZED)


def fallback(kind: str, row: int) -> str:
    """tensor_type_fallback: kind, or the type with blocks of 32 that rows of row values allow, or F16."""
    if row % BLOCK_VALUES[kind] == 0:
        return kind
    kind = FALLBACK.get(kind, kind)
    return kind if row % BLOCK_VALUES[kind] == 0 else "F16"


def tensor_type(preset: str, name: str, layer: int | None, layers: int, row: int, *, tied: bool) -> str | None:
    """The ggml type name llama-quantize's preset gives a 2-D tensor, or None where it keeps the tensor's
    own type (it is not quantized).

    Args:
        preset: "Q4_K_M" or "Q5_K_M".
        name: the GGUF tensor name ("blk.3.attn_v.weight", "token_embd.weight", "output.weight").
        layer: its block index (None outside the blocks); layers: the model's block count. llama.cpp
            counts attn_v and ffn_down tensors in its sorted tensor order, which is the layer index for a
            model with one of each per layer.
        row: values per row (ne[0]: the input features of a Linear, the hidden size of an embedding).
        tied: the file has no output.weight (token_embd serves as the output).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown llama-quantize preset {preset!r}: one of {sorted(PRESETS)}")
    if not quantized(name):
        return None
    chosen = PRESETS[preset]["default"]
    role = category(name)
    if role == "output" or (tied and role == "token_embd"):
        chosen = OUTPUT_FALLBACK if row % BLOCK_VALUES[chosen] else OUTPUT_TYPE
    elif role in MORE_BITS_CATEGORIES and more_bits(layer, layers):
        chosen = PRESETS[preset]["more_bits"]
    return fallback(chosen, row)
