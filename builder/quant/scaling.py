"""Per-channel factors folded into each decoder layer's norms and the Linears reading them, so the layer
computes the same function with channels easier to quantize: SmoothQuant (quant.smoothing, activations
flattened for W8A8) and AWQ-style scaling (quant.awq, the channels the activations use most kept finer
in weight-only recipes). Calibration calls them layer by layer (calibrate.calibrate); the writer applies
the same factors to the tensors it reads (quantize.smoothed).

    factors = scaling.smooth(layer, prefix, family, run_layer, alpha)
    factors = scaling.scale_activations(layer, prefix, family, readers, stats, recipe)
"""

import torch

from builder.quant import gptq, quantize
from builder.quant.observe import weight_scale
from builder.source import skeleton
from builder.release import families
from builder.release.recipe import Args, Recipe

SMOOTHING_FLOOR = 1e-5  # smallest max |x|, max |w|, rms and factor used: no channel divides by zero


def smooth(layer: torch.nn.Module, prefix: str, family, run_layer, alpha: float) -> dict:
    """SmoothQuant on one decoder layer, in place: each norm of families.SMOOTHED_NORMS is divided, and
    the weight columns of the Linears reading its output multiplied, by one factor per channel,
    s = max|x|^alpha / max|w|^(1 - alpha) (max |x| over the calibration tokens, max |w| over the rows of
    every such Linear), so the layer computes the same function with flatter activations.

    run_layer() runs the layer once over the calibration batches, to see the maxima and which Linears
    read which norm. Returns {checkpoint tensor name: factor (FP32, CPU)} for the norms' and the Linears' weights,
    so the writer applies the same factors to the tensors it reads (quantize.smoothed)."""
    linears = dict(layer.named_modules())
    amax = {}

    def on_norm(name, output):
        channel_max = output.detach().reshape(-1, output.shape[-1]).abs().amax(dim=0).to(torch.float32)
        amax[name] = channel_max if name not in amax else torch.maximum(amax[name], channel_max)

    watched = watch_norms(layer, on_norm)
    run_layer()
    readers = watched()
    factors = {}
    with torch.no_grad():
        for name in families.SMOOTHED_NORMS:
            weight_max = torch.stack([linears[reader].weight.abs().amax(dim=0) for reader in readers[name]]).amax(dim=0)
            factor = (amax[name].clamp(min=SMOOTHING_FLOOR).pow(alpha)
                      / weight_max.clamp(min=SMOOTHING_FLOOR).pow(1 - alpha)).clamp(min=SMOOTHING_FLOOR)
            factors.update(fold(layer, prefix, family, name, readers[name], factor))
    return factors


def fold(layer: torch.nn.Module, prefix: str, family, norm: str, readers: list, factor: torch.Tensor) -> dict:
    """norm ÷ factor and its readers' weight columns × factor, in place (the layer's function is kept);
    {checkpoint tensor name: factor} for quantize.smoothed, one CPU copy shared by all of them."""
    modules = dict(layer.named_modules())
    modules[norm].weight.div_(factor)
    for reader in readers:
        modules[reader].weight.mul_(factor)
    kept = factor.cpu()
    return {skeleton.checkpoint_name(prefix + module, family) + ".weight": kept for module in (norm, *readers)}


def watch_norms(layer: torch.nn.Module, on_output=None):
    """Hooks that find, while the layer runs, which Linears read each norm of families.SMOOTHED_NORMS
    (by tensor identity) and hand each norm output to on_output(norm, output). Returns a function that
    removes the hooks and gives {norm: [Linear names in the layer, in the order they ran]}."""
    norms = {name: getattr(layer, name) for name in families.SMOOTHED_NORMS}
    outputs, readers, undo = {}, {name: [] for name in norms}, []

    def on_norm(name):
        def hook(module, args, output):
            outputs[name] = output
            if on_output is not None:
                on_output(name, output)
        return hook

    def on_linear(linear):
        def hook(module, args):
            for name, output in outputs.items():
                if args[0] is output and linear not in readers[name]:
                    readers[name].append(linear)
        return hook

    for name, norm in norms.items():
        undo.append(norm.register_forward_hook(on_norm(name)).remove)
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            undo.append(module.register_forward_pre_hook(on_linear(name)).remove)

    def finish() -> dict:
        for remove in undo:
            remove()
        outputs.clear()
        for name, found in readers.items():
            if not found:
                raise RuntimeError(f"{name}: no Linear reads its output")  # smoothable() families do
        return readers
    return finish


def scale_activations(layer: torch.nn.Module, prefix: str, family, readers: dict, stats: dict,
                      recipe: Recipe) -> dict:
    """AWQ-style activation-aware scaling of one decoder layer, in place, from the statistics observe()
    gathered on it: for each norm of families.SMOOTHED_NORMS, a factor per input channel
    s = rms(x)^alpha (normalised so max(s) x min(s) = 1) for the alpha in 0, 1/grid, ..., 1 - 1/grid whose
    rounded weights Q(W s) / s give the least output error on the calibration inputs,
    sum over the norm's readers of tr((Q(W s)/s - W) H (Q(W s)/s - W)ᵀ) with H = sum x xᵀ (GPTQ's
    Hessian: no extra pass over the layer). Rounding is the recipe's own: its observer, its scale dtype,
    round to nearest. alpha 0 (s = 1) is the layer as it is, so the chosen factor never raises the error.

    The norm is divided by s and its readers' columns multiplied by s, and the readers' statistics
    follow (H / s sᵀ, E[x²] / s²), so GPTQ and the observer then work on the scaled layer. Returns
    {checkpoint tensor name: s (FP32, CPU)}, as smooth() does, for quantize.smoothed."""
    args, grid = recipe.weights, recipe.awq
    scale_dtype, _ = quantize.scale_format(recipe)
    modules = dict(layer.named_modules())
    factors = {}
    with torch.no_grad():
        for norm, names in readers.items():
            keys = {name: skeleton.checkpoint_name(prefix + name, family) for name in names}
            rounded = [name for name in names if keys[name] in stats["hessian"]]  # the targeted readers
            if not rounded:
                continue
            hessian = stats["hessian"][keys[rounded[0]]]  # readers of one tensor share one sum (observe)
            weights = [modules[name].weight.data.to(torch.float32) for name in rounded]
            magnitude = torch.diag(hessian).clamp(min=SMOOTHING_FLOOR).sqrt()  # rms(x), up to one constant
            best, lowest = None, None
            for step in range(grid):
                factor = magnitude.pow(step / grid)
                factor = factor / (factor.max() * factor.min()).sqrt()
                error = sum(output_error(weight, factor, hessian, args, scale_dtype) for weight in weights)
                if lowest is None or error < lowest:
                    best, lowest = factor, error
            factors.update(fold(layer, prefix, family, norm, names, best))
            # the shared sums, each rescaled once: H / s sᵀ, and the imatrix's sum of x² / s²
            for sums in {id(stats["hessian"][key]): stats["hessian"][key] for key in keys.values()
                         if key in stats["hessian"]}.values():
                sums.div_(best[:, None] * best[None, :])
            for total in {id(stats["imatrix"][key]): stats["imatrix"][key] for key in keys.values()
                          if key in stats["imatrix"]}.values():
                total[0].div_(best.square())
    return factors


def output_error(weight: torch.Tensor, factor: torch.Tensor, hessian: torch.Tensor, args: Args,
                 scale_dtype: torch.dtype) -> float:
    """tr(D H Dᵀ) for D = Q(weight x factor) / factor - weight: the squared output error of the rounded,
    scaled weight on the inputs whose x xᵀ sum is hessian (FP64 total)."""
    scaled = weight * factor
    scale = weight_scale(scaled, args, scale_dtype, torch.diag(hessian) / factor.square())
    difference = gptq.dequantize(quantize.quantize_weight(scaled, scale.to(torch.float32), args), scale, args) / factor - weight
    return float(((difference @ hessian) * difference).sum(dtype=torch.float64))
