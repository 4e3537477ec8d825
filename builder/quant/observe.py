"""Weight scale search, the recipe's weights `observer`: minmax (max |w|), or mse / imatrix_mse (the
clipping ratio per tensor, channel or group whose stored scale rounds the weights with the least error).

    scale = observe.weight_scale(weight, recipe.weights, torch.bfloat16, importance)

Deterministic: a fixed list of candidate ratios tried in order, FP32 arithmetic with the scale exactly
as stored, errors summed per scale cell (one reduction along the cell's contiguous elements: its order
depends on the shape, not on the thread count), and a strict `<`, so ties keep the larger ratio (the
first tried; ratio 1 is minmax).
"""

from dataclasses import replace

import torch

from builder.console import progress
from builder.formats import experts
from builder.quant import fp4, quantize
from builder.quant.results import Calibration
from builder.release.recipe import Args, Recipe
from builder.tensorfile import reader


def weight_scale(weight: torch.Tensor, args: Args, dtype: torch.dtype, importance: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """The stored scales (in dtype) of an FP32 weight [rows, columns] under args' observer.

    minmax: max |w| / half the type's range per cell. mse, imatrix_mse: for each ratio p in
    1, 1 - 1/grid, ..., 1 - maxshrink, the scale of p * max |w| (cast to dtype, as stored) rounds the
    cell; its error is sum |w - Q(w)|^norm, each column weighted by the inputs' E[x_j^2] (importance,
    normalised to mean 1) for imatrix_mse, and each cell keeps the ratio with the least error. A cell
    stops after `patience` ratios in a row that did not lower its error (0: it tries every ratio).
    importance None (a Linear calibration never reached) searches unweighted.
    """
    amax = quantize.grouped_amax(weight, args)
    best = quantize.scale_from_amax(amax, args, dtype)
    if args.observer == "minmax":
        return best
    settings = args.search
    columns = column_weights(importance) if args.observer == "imatrix_mse" else None
    cells, weights = cell_view(weight, args), None if columns is None else cell_view(columns, args, weight.shape[0])
    return shrink(amax, best, settings, lambda amax: quantize.scale_from_amax(amax, args, dtype),
                  lambda scale: cell_error(cells, scale, args, settings["norm"], weights))


def shrink(amax: torch.Tensor, best: torch.Tensor, settings: dict, scale_of, error_of) -> torch.Tensor:
    """The ratio search of every searching observer: from the scales of max |w| (best), each cell takes
    the scale_of(p * amax) of the ratio p (1 - 1/grid, ..., 1 - maxshrink) whose error_of is the least
    (strict <: ties keep the larger ratio), and stops after `patience` ratios in a row without a lower one."""
    lowest = error_of(best)
    stale = torch.zeros(lowest.shape, dtype=torch.int64, device=lowest.device)  # ratios without improvement
    patience = settings["patience"]
    for step in range(1, round(settings["maxshrink"] * settings["grid"]) + 1):
        scale = scale_of(amax * (1 - step / settings["grid"]))
        error = error_of(scale)
        better = error < lowest
        if patience:
            better &= stale < patience
        lowest = torch.where(better, error, lowest)
        best = torch.where(better, scale, best)
        stale = torch.where(better, 0, stale + 1)
        if patience and bool((stale >= patience).all()):
            break
    return best


def fp4_scales(weight: torch.Tensor, args: Args, global_scale: torch.Tensor,
               importance: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4's FP8 group scales (builder/quant/fp4.py) of an FP32 weight under its global scale, by args'
    observer: minmax, global * max|group| / 6; mse and imatrix_mse search each group's ratio of max |w| as
    weight_scale does, the global scale held (max |w| over the fused Linears: it only sets the FP8 scales'
    range), the error that of the E2M1 values the writer would store."""
    amax = fp4.group_amax(weight, args.group_size)
    best = fp4.scales_from_amax(amax, global_scale)
    if args.observer == "minmax":
        return best
    threads = torch.get_num_threads()
    if weight.device.type == "cpu":  # ~20 small elementwise passes a ratio: one thread, no fork-join (same bytes)
        torch.set_num_threads(1)
    try:
        return fp4_search(weight, args, global_scale, importance, amax, best)
    finally:
        torch.set_num_threads(threads)


def fp4_search(weight: torch.Tensor, args: Args, global_scale: torch.Tensor, importance: torch.Tensor | None,
               amax: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """fp4_scales' search from the max |w| scales (best) of the group maxima (amax)."""
    settings = args.search
    columns = column_weights(importance) if args.observer == "imatrix_mse" else None
    cells = weight.reshape(weight.shape[0], -1, args.group_size)
    weights = None if columns is None else columns.reshape(1, -1, args.group_size)
    return shrink(amax, best, settings, lambda amax: fp4.scales_from_amax(amax, global_scale),
                  lambda scale: fp4_error(cells, scale, global_scale, settings["norm"], weights))


def fp4_error(cells: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, norm: float,
              weights: torch.Tensor | None) -> torch.Tensor:
    """sum over each group of |w - Q(w)|^norm (times the column weights), FP32 [rows, groups]: Q rounds to
    E2M1 with the group's scale / global, as fp4.quantize_weight does."""
    step = fp4.steps(scale, global_scale).unsqueeze(-1)
    error = fp4.rounded(cells / step).mul_(step).sub_(cells).abs_()
    error = error.square_() if norm == 2 else error.pow_(norm)
    if weights is not None:
        error *= weights
    return error.sum(dim=-1)


def column_weights(importance: torch.Tensor | None) -> torch.Tensor | None:
    """E[x_j^2] per input column normalised to mean 1, as a row [1, columns]; None when unusable
    (no calibration input reached the Linear, or nothing is positive)."""
    if importance is None or not bool(torch.isfinite(importance).all()) or not bool((importance > 0).any()):
        return None
    importance = importance.to(torch.float32).clamp(min=0)
    return (importance / importance.mean()).reshape(1, -1)


def cell_view(values: torch.Tensor, args: Args, rows: int | None = None) -> torch.Tensor:
    """values [rows, columns] (or column weights [1, columns], repeated to rows for the tensor-wide cell)
    as [rows or 1, groups or 1, width]: a group or channel cell's elements along the last axis; the
    tensor's one cell as [1, rows, columns]."""
    if args.strategy == "group":
        return values.reshape(values.shape[0], -1, args.group_size)
    if args.strategy == "channel":
        return values.reshape(values.shape[0], 1, -1)
    if rows is not None:
        values = values.expand(rows, -1)
    return values.reshape(1, *values.shape)  # one cell, summed row by row, then over the rows


def cell_error(cells: torch.Tensor, scale: torch.Tensor, args: Args, norm: float,
               weights: torch.Tensor | None) -> torch.Tensor:
    """sum over each scale cell of |w - Q(w)|^norm (times the column weights), FP32, shaped like scale.

    cells: the weight as cell_view gives it. Q rounds exactly as quantize.quantize_weight does, with
    the scale as stored, so the error is the artifact's."""
    step = scale.to(torch.float32).reshape(cells.shape[0], -1, 1)
    q_min, q_max = args.value_range
    scaled = (cells / step).clamp_(q_min, q_max)
    restored = scaled.to(quantize.FP8).to(torch.float32) if args.type == "float" else scaled.round_()
    error = restored.mul_(step).sub_(cells).abs_()
    error = error.square_() if norm == 2 else error.pow_(norm)
    if weights is not None:
        error *= weights
    total = error.sum(dim=-1)
    return (total.sum(dim=-1) if args.strategy == "tensor" else total).reshape(scale.shape)


def searched_scales(recipe: Recipe, tensors: dict, modules: dict,
                    calibration: Calibration | None) -> Calibration | None:
    """calibration with the searched weight scales of every targeted tensor GPTQ did not round, in
    weight_scale ({module: scale}, small: one value per cell); calibration unchanged for minmax.

    One pass over the targeted tensors, each read and searched once (export's writer asks for a
    weight's scale and its values at different times, and would search twice). importance is the
    calibration's E[x^2] per column (imatrix_mse)."""
    if recipe.weights is None or recipe.weights.observer == "minmax":
        return calibration
    found = calibration or Calibration()
    rounded, importance = found.gptq, found.imatrix
    dtype, _ = quantize.scale_format(recipe)
    names = [name for name in sorted(tensors) if quantize.targeted(name, tensors[name].shape, modules, recipe)
             and (experts.fused(name, tuple(tensors[name].shape)) or name[: -len(".weight")] not in rounded)]
    scales = {}
    with reader(tensors) as read:
        for name in progress(names, desc="search scales", unit="tensor"):
            for module, weight in linears(name, read, calibration).items():  # fused experts: one per expert
                if module not in rounded and recipe.quantizes(module):
                    quantize.require_finite(f"{module}.weight", quantize.grouped_amax(weight, recipe.weights))
                    scales[module] = weight_scale(weight, recipe.weights, dtype, importance.get(module))
    return replace(found, weight_scale=scales)


def linears(name: str, read, calibration: Calibration | None) -> dict:
    """{module: weight, FP32} of a targeted tensor: a Linear's weight (SmoothQuant's or AWQ's factor applied), or
    the per-expert Linears a fused experts parameter is written as (formats/experts.py)."""
    tensor = read(name)
    if experts.fused(name, tuple(tensor.shape)):
        return {module: weight.to(torch.float32) for module, weight in experts.split(name, tensor).items()}
    return {name[: -len(".weight")]: quantize.smoothed(name, tensor, calibration).to(torch.float32)}
