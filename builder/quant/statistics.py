"""Activation statistics, two calibration steps: max |input| of every targeted Linear (static input
scales; it also tells which Linears the calibration tokens reached) and max |key|, |value| entering
the KV cache (KV-cache scales). Exact: maxima, whatever the batch order.

    found["input_amax"][module], found["kv_amax"]["model.layers.N.self_attn.k_scale"]   (each [1], FP32)
"""

import torch

from builder.quant.step import ANY, CALIBRATION, Layer, Step, rows

KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale")  # where compressed-tensors and vLLM look for them


def running_max(found: dict, name: str, tensor: torch.Tensor) -> None:
    """found[name] = max(found[name], max |tensor|), as a [1] FP32 tensor."""
    amax = tensor.detach().abs().amax().to(torch.float32).reshape(1)
    previous = found.get(name)
    found[name] = amax if previous is None else torch.maximum(previous, amax)


def observe_inputs(layer: Layer, recipe) -> dict:
    """Hooks keeping max |input| per targeted Linear: {checkpoint name: [1]}, filled as the layer runs."""
    amax = {}
    for name, module in layer.linears.items():
        layer.on_input(module, lambda module, args, name=name: running_max(amax, name, rows(args)))
    return amax


def finish_inputs(layer: Layer, recipe, seen: dict) -> dict:
    """The layer's input maxima; experts no calibration token was routed to get the largest maximum
    the layer's other experts saw (vLLM keeps one input scale per MoE layer, their maximum, anyway)
    and are logged (the steps that need their inputs round them to nearest)."""
    amax = seen["activations"]
    unseen = sorted(name for name in layer.linears if name not in amax)
    if unseen:
        seen_experts = [value for name, value in amax.items() if ".experts." in name]
        fallback = torch.stack(seen_experts).amax(dim=0) if seen_experts else None
        for name in unseen:
            if fallback is None:
                raise RuntimeError(f"{name}: no calibration input reached it")  # only experts can go unseen
            amax[name] = fallback
        layer.log(f"{layer.prefix[:-1]}: no calibration token reached {len(unseen)} expert weights "
                  f"({', '.join(unseen[:3])}{', ...' if len(unseen) > 3 else ''}): round to nearest"
                  + (", input scale from the layer's other experts" if recipe.static_inputs else ""))
    return {"input_amax": amax}


def observe_kv(layer: Layer, recipe) -> dict:
    """max |key| and |value| (post-RoPE, as they enter the KV cache: the attention function
    layerwise.register installs hands them to self_attn.builder_observe) under the scales' names."""
    attention, amax = layer.module.self_attn, {}
    names = [layer.prefix + scale for scale in KV_SCALES]

    def on_kv(key, value):
        for name, tensor in zip(names, (key, value)):
            running_max(amax, name, tensor)

    attention.builder_observe = layer.only(CALIBRATION, on_kv)
    layer.removers.append(lambda: delattr(attention, "builder_observe"))
    return amax


ACTIVATIONS = Step("activations", ("input_amax",), {"needs_calibration": True},
                   observe=observe_inputs, finish=finish_inputs)
KV_CACHE = Step("kv_cache", ("kv_amax",), {"kv_cache_scheme": ANY},
                observe=observe_kv, finish=lambda layer, recipe, seen: {"kv_amax": seen["kv_cache"]})
