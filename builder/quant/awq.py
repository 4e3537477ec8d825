"""AWQ-style activation-aware scaling (quant.awq {grid}), a calibration step for weight-only recipes:
per norm, the factor rms(x)^alpha that keeps the channels the activations use most finer in the
rounded weights, searched on GPTQ's Hessians (no extra pass over the layer) and folded into the layer
(builder/quant/scaling.py) before GPTQ and the observer see it.

    found["smoothing"][checkpoint tensor] -> factor per input channel (FP32)
"""

import torch

from builder.quant import gptq, quantize, scaling
from builder.quant.observe import weight_scale
from builder.quant.step import ANY, Layer, Step
from builder.release.recipe import Args, Recipe


def observe(layer: Layer, recipe: Recipe) -> dict:
    """Which Linears read each norm (the Hessians are the hessian step's)."""
    return scaling.watch_norms(layer)


def finish(layer: Layer, recipe: Recipe, seen: dict) -> dict:
    """For each norm of families.SMOOTHED_NORMS, a factor per input channel s = rms(x)^alpha
    (normalised so max(s) x min(s) = 1) for the alpha in 0, 1/grid, ..., 1 - 1/grid whose rounded
    weights Q(W s) / s give the least output error on the calibration inputs, sum over the norm's
    readers of tr((Q(W s)/s - W) H (Q(W s)/s - W)ᵀ) with H = sum x xᵀ. Rounding is the recipe's own:
    its observer, its scale dtype, round to nearest. alpha 0 (s = 1) is the layer as it is, so the
    chosen factor never raises the error.

    The norm is divided by s and its readers' columns multiplied by s, in place, and the readers'
    sums follow (H / s sᵀ, and the imatrix_mse observer's sum of x² / s²), so GPTQ and the observer
    then work on the scaled layer. Returns {"smoothing": {checkpoint tensor name: s}}, as SmoothQuant
    does, for quantize.smoothed."""
    args, grid = recipe.weights, recipe.awq
    hessians, squares = seen["hessian"], seen.get("mean_squares", {})
    scale_dtype, _ = quantize.scale_format(recipe)
    modules = dict(layer.module.named_modules())
    factors = {}
    with torch.no_grad():
        for norm, names in scaling.read_by(seen["awq"]).items():
            keys = [layer.name(name) for name in names]
            rounded = [name for name, key in zip(names, keys) if key in hessians]  # the targeted readers
            if not rounded:
                continue
            hessian = hessians[layer.name(rounded[0])][0]  # readers of one tensor share one sum
            weights = [modules[name].weight.data.to(torch.float32) for name in rounded]
            magnitude = torch.diag(hessian).clamp(min=scaling.SMOOTHING_FLOOR).sqrt()  # rms(x), up to one constant
            best, lowest = None, None
            for step in range(grid):
                factor = magnitude.pow(step / grid)
                factor = factor / (factor.max() * factor.min()).sqrt()
                error = sum(output_error(weight, factor, hessian, args, scale_dtype) for weight in weights)
                if lowest is None or error < lowest:
                    best, lowest = factor, error
            factors.update(scaling.fold(layer, norm, names, best))
            for sums, divisor in ((hessians, best[:, None] * best[None, :]), (squares, best.square())):
                for entry in {id(sums[key]): sums[key] for key in keys if key in sums}.values():
                    entry[0].div_(divisor)  # each shared sum rescaled once
    return {"smoothing": factors}


def output_error(weight: torch.Tensor, factor: torch.Tensor, hessian: torch.Tensor, args: Args,
                 scale_dtype: torch.dtype) -> float:
    """tr(D H Dᵀ) for D = Q(weight x factor) / factor - weight: the squared output error of the rounded,
    scaled weight on the inputs whose x xᵀ sum is hessian (FP64 total)."""
    scaled = weight * factor
    scale = weight_scale(scaled, args, scale_dtype, torch.diag(hessian) / factor.square())
    difference = gptq.dequantize(quantize.quantize_weight(scaled, scale.to(torch.float32), args), scale, args) / factor - weight
    return float(((difference @ hessian) * difference).sum(dtype=torch.float64))


AWQ = Step("awq", ("smoothing",), {"awq": ANY}, needs=("hessian",), observe=observe, finish=finish)
