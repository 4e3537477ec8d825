"""SmoothQuant (Xiao et al., 2023; quant.smoothing {alpha}), a calibration step for W8A8: per-channel
factors that flatten each norm's output (the activations to quantize) and move its range into the
weights of the Linears reading it, folded into the layer (builder/quant/scaling.py) before the other
steps observe it.

    found["smoothing"][checkpoint tensor] -> factor per input channel (FP32)
"""

import torch

from builder.quant import scaling
from builder.quant.step import ANY, Layer, Step
from builder.release import families


def observe(layer: Layer, recipe) -> dict:
    """Hooks keeping max |x| per channel of each norm's output, and which Linears read it."""
    amax = {}

    def on_norm(name, output):
        channel_max = output.detach().reshape(-1, output.shape[-1]).abs().amax(dim=0).to(torch.float32)
        amax[name] = channel_max if name not in amax else torch.maximum(amax[name], channel_max)

    return {"amax": amax, "readers": scaling.watch_norms(layer, on_norm)}


def finish(layer: Layer, recipe, seen: dict) -> dict:
    """Each norm of families.SMOOTHED_NORMS divided, and the weight columns of the Linears reading its
    output multiplied, by s = max|x|^alpha / max|w|^(1 - alpha) (max |x| over the calibration tokens,
    max |w| over the rows of every such Linear), in place: the layer computes the same function with
    flatter activations. {"smoothing": {checkpoint tensor name: s}} for the norms' and the Linears'
    weights, so the writer applies the same factors (quantize.smoothed)."""
    amax, readers = seen["smoothquant"]["amax"], scaling.read_by(seen["smoothquant"]["readers"])
    alpha, floor = recipe.smoothing, scaling.SMOOTHING_FLOOR
    modules = dict(layer.module.named_modules())
    factors = {}
    with torch.no_grad():
        for name in families.SMOOTHED_NORMS:
            weight_max = torch.stack([modules[reader].weight.abs().amax(dim=0) for reader in readers[name]]).amax(dim=0)
            factor = (amax[name].clamp(min=floor).pow(alpha)
                      / weight_max.clamp(min=floor).pow(1 - alpha)).clamp(min=floor)
            factors.update(scaling.fold(layer, name, readers[name], factor))
    return {"smoothing": factors}


SMOOTHQUANT = Step("smoothquant", ("smoothing",), {"smoothing": ANY}, observe=observe, finish=finish, own_pass=True)
