"""GPTQ (Frantar et al., 2022) as two calibration steps: each targeted Linear's input second moments
(HESSIAN: sum of x xᵀ, also read by AWQ), then each Linear rounded column by column with the error
compensated on the columns not yet rounded (GPTQ), the layer run again on its rounded weights so the
next layer sees quantized outputs. Deterministic, FP32, on the weight's device; results spilled to disk
layer by layer (builder/spill.py).

    values, scale = gptq.quantize(weight, hessian, Recipe.of(spec["quant"]))
    found["gptq"][module] -> (values, scale)
"""

import torch

from builder.errors import BuilderError, Problem
from builder.quant import observe
from builder.quant.quantize import FP8, quantize_weight, scale_format
from builder.quant.step import Layer, Step, means, shared_sums
from builder.release.recipe import Args, Recipe


def quantize(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe, module: str = "",
             importance: torch.Tensor | None = None) -> tuple:
    """Quantized weights (int8 or FP8 tensor) and their scales (output scale dtype) for one Linear.

    Scales come from the original weights (as round-to-nearest would choose them with the recipe's
    observer, cast to the stored dtype; importance: the inputs' E[x^2] per column, for imatrix_mse);
    GPTQ then picks each column's values so that the error on the calibration inputs' second moments
    (hessian = sum of x xᵀ) is compensated on the columns not yet rounded.
    """
    args, settings = recipe.weights, recipe.gptq
    weight = weight.to(torch.float32).clone()
    hessian = hessian.to(torch.float32).clone()
    scale_dtype, _ = scale_format(recipe)
    scale = observe.weight_scale(weight, args, scale_dtype, importance)
    column_scale = expand(scale.to(torch.float32), args, weight.shape[1]).expand(weight.shape[0], -1)
    order = column_order(hessian, settings.actorder)
    weight, hessian, column_scale = weight[:, order], hessian[order][:, order], column_scale[:, order]
    inverse = inverse_hessian(weight, hessian, settings.dampening_frac, module)
    q_min, q_max = args.value_range
    columns, block = weight.shape[1], settings.block_size
    for start in range(0, columns, block):
        end = min(start + block, columns)
        # the block's columns as contiguous rows (and its scales): each step reads and updates
        # contiguous memory; the same values meet the same operations, so the bytes are unchanged
        chunk, steps = weight[:, start:end].T.contiguous(), column_scale[:, start:end].T.contiguous()
        errors, local = torch.zeros_like(chunk), inverse[start:end, start:end]
        for i in range(end - start):
            column, step = chunk[i], steps[i]
            rounded = round_column(column, step, args, q_min, q_max)
            error = (column - rounded) / local[i, i]
            chunk[i:] -= local[i, i:].unsqueeze(1) * error.unsqueeze(0)
            chunk[i] = rounded
            errors[i] = error
        weight[:, start:end] = chunk.T
        weight[:, end:] -= errors.T.contiguous() @ inverse[start:end, end:]
    weight = weight[:, torch.argsort(order)]  # back to storage order: scales and layout are unchanged
    return quantize_weight(weight, scale.to(torch.float32), args), scale


def round_column(column: torch.Tensor, step: torch.Tensor, args: Args, q_min: float, q_max: float) -> torch.Tensor:
    """One column rounded to the grid and scaled back (FP32): integers round half to even; FP8
    clamps to ±448 and casts to E4M3 (round to nearest even), as the artifact's values are made."""
    if args.type == "float":
        return (column / step).clamp(q_min, q_max).to(FP8).to(torch.float32) * step
    return torch.round(column / step).clamp(q_min, q_max) * step


def column_order(hessian: torch.Tensor, actorder: str | None) -> torch.Tensor:
    """The order columns are rounded in: storage order, or ("static" activation ordering, as
    llm-compressor's default) by decreasing diagonal of the Hessian, ties kept in storage order.
    Rounding the columns that carry the most input energy first leaves the error compensation to
    columns that matter less; scales stay those of the storage-order groups, so no g_idx is needed."""
    if actorder is None:
        return torch.arange(hessian.shape[0], device=hessian.device)
    return torch.sort(torch.diag(hessian), descending=True, stable=True).indices


def expand(scale: torch.Tensor, args: Args, columns: int) -> torch.Tensor:
    """Scales as one column per weight column: [rows, columns]."""
    if args.strategy == "group":
        return scale.repeat_interleave(args.group_size, dim=1)
    return scale.expand(-1, columns) if scale.dim() == 2 else scale.reshape(1, 1).expand(1, columns)


def inverse_hessian(weight: torch.Tensor, hessian: torch.Tensor, dampening: float, module: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; inputs never seen zero their columns."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += torch.eye(hessian.shape[0], device=hessian.device) * (dampening * torch.mean(torch.diag(hessian)))
    try:
        lower = torch.linalg.cholesky(hessian)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except RuntimeError:
        raise BuilderError(Problem("quant", "gptq.dampening_frac", f"{dampening}: the Hessian of {module} "
                                   "is not positive definite; raise dampening_frac or calibrate on more "
                                   "samples")) from None


def dequantize(values: torch.Tensor, scale: torch.Tensor, args: Args) -> torch.Tensor:
    """values * scale in FP32, scales broadcast per tensor, channel or group."""
    return values.to(torch.float32) * expand(scale.to(torch.float32).reshape(-1, 1) if scale.dim() < 2
                                             else scale.to(torch.float32), args, values.shape[1])


def add_outer(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """total + xᵀ x (x: [tokens, features]), in place after the first batch."""
    return x.T @ x if total is None else total.addmm_(x.T, x)


def finish(layer: Layer, recipe: Recipe, seen: dict) -> dict:
    """Round each Linear of the layer with its Hessian (and the imatrix_mse observer's E[x²] when the
    recipe searches scales with it), leaving its rounded weights in the layer: {"gptq": {module:
    (values, scale)}}. A Linear no token reached (an expert) has no Hessian: it is rounded to nearest."""
    hessians = seen["hessian"]
    importance = means(seen["mean_squares"]) if "mean_squares" in seen else {}  # E[x²], builder/quant/imatrix.py
    results = {}
    for name, module in layer.linears.items():
        if name not in hessians:
            continue
        values, scale = quantize(module.weight.data, hessians[name][0], recipe, name, importance.get(name))
        results[name] = (values, scale)
        module.weight.data = dequantize(values, scale, recipe.weights)
    return {"gptq": results}


HESSIAN = Step("hessian", (), {}, observe=lambda layer, recipe: shared_sums(layer, add_outer))
GPTQ = Step("gptq", ("gptq",), {"algorithm": "gptq"}, needs=("hessian",), finish=finish, rewrites=True,
            spilled=True)
