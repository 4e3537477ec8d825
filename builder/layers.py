"""Module names and target patterns of Llama-family decoders, as data. Pure (no torch)."""

import re

# Linear layers of one decoder layer, and the architecture figure that is their input features.
DECODER_LINEARS = {
    "self_attn.q_proj": "hidden_size",
    "self_attn.k_proj": "hidden_size",
    "self_attn.v_proj": "hidden_size",
    "self_attn.o_proj": "attention_width",  # num_attention_heads * head_dim
    "mlp.gate_proj": "hidden_size",
    "mlp.up_proj": "hidden_size",
    "mlp.down_proj": "intermediate_size",
}
# The key and value projections whose outputs fill the KV cache, and the scale names vLLM loads.
KV_PROJECTIONS = {"self_attn.k_proj": "self_attn.k_scale", "self_attn.v_proj": "self_attn.v_scale"}


def matches(module: str, cls: str, patterns: list) -> bool:
    """compressed-tensors target syntax: a class name, a module name, or 're:<regex>' on the name."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module):
                return True
        elif pattern in (cls, module):
            return True
    return False


def input_features(arch: dict) -> dict:
    """module name (layer 0 standing for every layer, and lm_head) -> input features, from a model spec."""
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    sizes = {**arch, "attention_width": arch["num_attention_heads"] * head_dim}
    found = {f"model.layers.0.{name}": sizes[key] for name, key in DECODER_LINEARS.items()}
    found["lm_head"] = arch["hidden_size"]
    return found


def targeted_linears(arch: dict, quant: dict) -> dict:
    """The Linear modules (layer 0 for every layer) a recipe quantizes -> their input features."""
    return {name: size for name, size in input_features(arch).items()
            if matches(name, "Linear", quant["targets"]) and not matches(name, "Linear", quant["ignore"])}
