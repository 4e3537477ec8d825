"""GPTQ (Frantar et al., 2022) as two calibration steps: each targeted Linear's input second moments
(HESSIAN: sum of x xᵀ, also read by AWQ), then each Linear rounded column by column with the error
compensated on the columns not yet rounded (GPTQ, computed from the Cholesky factor of the Hessian
itself, as Babai's nearest-plane algorithm: no inverse), the layer run again on its rounded weights so
the next layer sees quantized outputs. Deterministic, FP32, on the weight's device; results spilled to
disk layer by layer (builder/spill.py).

    values, scale = gptq.quantize(weight, hessian, Recipe.of(spec["quant"]))
    found["gptq"][module] -> (values, scale)      (NVFP4: (E2M1 codes, FP8 group scales, FP32 global scale))
"""

from dataclasses import dataclass

import torch

from builder.errors import BuilderError, Problem
from builder.quant import asymmetric, fp4, layerwise, observe
from builder.quant.dampen import dampen_, indefinite
from builder.quant.quantize import FP8, fused, quantized_dtype, scale_format
from builder.quant.step import Layer, Step, means, shared_sums
from builder.release.recipe import Args, Recipe


def quantize(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe, module: str = "",
             importance: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> tuple:
    """Quantized weights (int8 or FP8 tensor) and their scales (output scale dtype) for one Linear;
    NVFP4 (strategy tensor_group): (E2M1 codes, FP8 group scales, global_scale), the global scale
    given (448 * 6 / max |w| of the Linears vLLM fuses) or the weight's own.

    Scales come from the original weights (as round-to-nearest would choose them with the recipe's
    observer, cast to the stored dtype; importance: the inputs' E[x^2] per column, for imatrix_mse);
    GPTQ then picks each column's values so that the error on the calibration inputs' second moments
    (hessian = sum of x xᵀ) is compensated on the columns not yet rounded. Neither input is changed.
    """
    factor = factorise(hessian.to(torch.float32).clone(), recipe.gptq, module)
    return round_weight(weight.to(torch.float32).clone(), factor, recipe, importance, global_scale)


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of a Hessian, shared by the Linears that read the same input: the order columns
    are rounded in, the inputs never seen (in that order), and R, the upper triangular factor of the
    dampened Hessian (permuted): H = R Rᵀ, held in the Hessian's own memory."""

    order: torch.Tensor
    dead: torch.Tensor
    root: torch.Tensor


def factorise(hessian: torch.Tensor, settings, module: str) -> Factor:
    """The Factor of a Hessian (FP32, [columns, columns]), computed in its memory: the Hessian is
    consumed. The same values meet the same operations as H[order][:, order], dampening and the
    Cholesky factor of its half turn on fresh tensors would: only no copy is made."""
    order = column_order(hessian, settings.actorder)
    if settings.actorder is not None:
        permute_(hessian, order)
    dead, _ = dampen_(hessian, settings.dampening_frac)
    return Factor(order, dead, upper_root(hessian, settings.dampening_frac, module))


def round_weight(weight: torch.Tensor, factor: Factor, recipe: Recipe,
                 importance: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> tuple:
    """GPTQ's column loop on one Linear's FP32 weight (consumed: its memory is the loop's) with the
    Factor of its Hessian: (values, scale) or NVFP4's (codes, scale, global) as quantize returns them.

    NVFP4's group scales come from the original weight (as llm-compressor's GPTQ takes them from its
    observer before rounding), under the global scale; each column is then rounded to E2M1 with its
    group's scale / global, exactly as builder/quant/fp4.py rounds the written codes."""
    args, block = recipe.weights, recipe.gptq.block_size
    fp4_groups = args.strategy == "tensor_group"
    if fp4_groups:
        if global_scale is None:
            global_scale = fp4.global_scale(weight.abs().amax())
        scale = observe.fp4_scales(weight, args, global_scale, importance)
        steps_of = column_steps(fp4.steps(scale, global_scale), args, weight.shape[0])
    else:
        scale_dtype, _ = scale_format(recipe)
        scale = observe.weight_scale(weight, args, scale_dtype, importance)
        steps_of = column_steps(scale.to(torch.float32), args, weight.shape[0])
    codes = torch.empty(weight.shape, dtype=torch.uint8 if fp4_groups else quantized_dtype(args), device=weight.device)
    order = factor.order
    if recipe.gptq.actorder is not None:
        permute_columns_(weight, order)
    weight[:, factor.dead] = 0
    column_loop(weight, factor.root, order, steps_of, args, block, codes)
    del factor, weight  # given the last reference (finish pops it), the Hessian's memory goes now
    if recipe.gptq.actorder is not None:
        permute_columns_(codes.view(torch.uint8), torch.argsort(order))  # storage order: scales and layout unchanged
    return (codes, scale, global_scale) if fp4_groups else (codes, scale)


PANEL = 16  # columns whose sums are updated one by one; the rest of the block gets the panel's part as one product


def column_loop(weight: torch.Tensor, root: torch.Tensor, order: torch.Tensor, steps_of, args: Args,
                block: int, codes: torch.Tensor) -> None:
    """GPTQ's blocked column loop on the FP32 weight w (columns in order; consumed) with R, the upper
    factor of the permuted Hessian (H = R Rᵀ); each column's code goes into codes (same order).

    GPTQ rounds v_j, the weight compensated for the error of the columns rounded before it. With the
    upper Cholesky factor U of H⁻¹ it subtracts e_i U_ij, e_i = (v_i - q_i) / U_ii; since U = R⁻¹ the same
    v_j is w_j + (Σ_{i<j} d_i R_ij) / R_jj with d_i = w_i - q_i (Babai's nearest plane, Chen et al.
    2025), which needs R alone. Each block of columns gets the earlier blocks' part of the sum as one
    product (their d, held in the weight's memory); within the block, each PANEL of columns adds its
    part to its own columns one column at a time, and to the rest of the block as one product."""
    q_min, q_max = args.value_range
    columns = weight.shape[1]
    single = weight.device.type == "cpu"
    threads = torch.get_num_threads()
    for start in range(0, columns, block):
        end = min(start + block, columns)
        # the block's columns as contiguous rows (and its scales): each step reads and updates contiguous memory
        chunk, steps = weight[:, start:end].T.contiguous(), steps_of(order[start:end])
        sums = (torch.mm(root[:start, start:end].T, weight[:, :start].T) if start
                else torch.zeros_like(chunk))  # Σ_{i<start} d_i R_ij, [block columns, rows]
        local, found = root[start:end, start:end], torch.empty(chunk.shape, dtype=codes.dtype, device=codes.device)
        if single:  # elementwise work on a few MB: one thread, no fork-join per column
            torch.set_num_threads(1)
        try:
            for first in range(0, end - start, PANEL):
                last = min(first + PANEL, end - start)
                for i in range(first, last):
                    found[i], rounded = round_column(chunk[i] + sums[i] / local[i, i], steps[i], args, q_min, q_max)
                    chunk[i] -= rounded  # d_i = w_i - q_i
                    sums[i + 1:last].addr_(local[i, i + 1:last], chunk[i])
                sums[last:].addmm_(local[first:last, last:].T, chunk[first:last])  # the panel's part, at once
        finally:
            torch.set_num_threads(threads)
        weight[:, start:end] = chunk.T
        codes[:, start:end] = found.T
        del chunk, sums, found


def column_steps(scale: torch.Tensor, args: Args, rows: int):
    """index (storage-order columns) -> their scales as rows [len(index), rows], FP32: what the columns
    of expand(scale) holds, gathered a block at a time instead of materialised whole."""
    if args.strategy in ("group", "tensor_group"):
        return lambda index: scale[:, index // args.group_size].T.contiguous()
    view = expand(scale, args, 1).expand(rows, 1)
    return lambda index: view.expand(rows, len(index)).T.contiguous()


ROW_BLOCK = 256  # rows moved at a time by the in-place permutations


def permute_columns_(matrix: torch.Tensor, index: torch.Tensor) -> None:
    """matrix[:, index] in place, a block of rows at a time (a block's copy is the only scratch)."""
    for start in range(0, matrix.shape[0], ROW_BLOCK):
        rows = matrix[start:start + ROW_BLOCK]
        rows.copy_(rows[:, index])


def permute_(square: torch.Tensor, order: torch.Tensor) -> None:
    """square[order][:, order] in place: columns a block of rows at a time, then rows along the
    permutation's cycles (one row of scratch). Values only move."""
    permute_columns_(square, order)
    targets, done = order.tolist(), [False] * len(order)
    for first in range(len(targets)):
        if done[first] or targets[first] == first:
            continue
        held, position = square[first].clone(), first
        while targets[position] != first:
            square[position] = square[targets[position]]
            done[position], position = True, targets[position]
        square[position] = held
        done[position] = True


def round_column(column: torch.Tensor, step: torch.Tensor, args: Args, q_min: float, q_max: float) -> tuple:
    """One column's codes and their values (FP32, scaled back), as the artifact's are made: integers
    round half to even (int8 codes); FP8 clamps to ±448 and casts to E4M3 (round to nearest even; the
    codes are the FP8 values); FP4 clamps to ±6 and rounds to E2M1 (uint8 codes, builder/quant/fp4.py)."""
    if args.type == "float" and args.num_bits == 4:
        codes = fp4.encode(column / step)
        return codes, fp4.decode(codes) * step
    if args.type == "float":
        codes = (column / step).clamp(q_min, q_max).to(FP8)
        return codes, codes.to(torch.float32) * step
    codes = torch.round(column / step).clamp(q_min, q_max)
    return codes, codes * step


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


def upper_root(hessian: torch.Tensor, dampening: float, module: str) -> torch.Tensor:
    """R, upper triangular with H = R Rᵀ, for a (dampened) Hessian H, computed in the Hessian's memory:
    the returned tensor is a column-major view of it.

    With J the reversal (J H J reverses H's rows and columns) and L the lower Cholesky factor of J H J,
    H = (J L J)(J L J)ᵀ and J L J is upper triangular: R is one Cholesky and a half turn away. LAPACK
    reads the lower triangle of the column-major view, which is the row-major upper one: it is filled
    with H's lower triangle turned half a turn, which is J H J's."""
    turned_lower_onto_upper_(hessian)
    factor = hessian.mT  # column-major: LAPACK's own layout, so torch copies nothing
    try:
        torch.linalg.cholesky(factor, out=factor)
    except RuntimeError:
        raise indefinite(dampening, module) from None
    turn_(hessian)  # J L J (a half turn of the square): upper triangular
    return factor


def turned_lower_onto_upper_(square: torch.Tensor) -> None:
    """square[r, c] = square[n-1-r, n-1-c] for r <= c, in place a block of rows at a time: the upper
    triangle (diagonal included) becomes the lower triangle turned half a turn. The lower triangle is
    only read, the upper only written (the diagonal is read first)."""
    size = square.shape[0]
    diagonal = square.diagonal().flip(0).clone()
    columns = torch.arange(size, device=square.device)
    for start in range(0, size, ROW_BLOCK):
        end = min(start + ROW_BLOCK, size)
        rows = torch.arange(start, end, device=square.device).unsqueeze(1)
        block = square[start:end]
        block.copy_(torch.where(columns > rows, square[size - end:size - start].flip(0, 1), block))
    square.diagonal().copy_(diagonal)


def turn_(square: torch.Tensor) -> None:
    """square[r, c] = square[n-1-r, n-1-c] everywhere, in place (the top rows swap with the bottom ones,
    a block at a time; one block of scratch)."""
    size = square.shape[0]
    half = size // 2
    for start in range(0, half, ROW_BLOCK):
        end = min(start + ROW_BLOCK, half)
        top = square[start:end].clone()
        square[start:end] = square[size - end:size - start].flip(0, 1)
        square[size - end:size - start] = top.flip(0, 1)
    if size % 2:
        square[half] = square[half].flip(0)


def dequantize(values: torch.Tensor, scale: torch.Tensor, args: Args) -> torch.Tensor:
    """values * scale in FP32, scales broadcast per tensor, channel or group (each value meets its own
    scale once, in place: no [rows, columns] copy of the scales)."""
    result = values.to(torch.float32)
    scale = scale.to(torch.float32)
    if args.strategy == "group":
        rows, columns = result.shape
        result.view(rows, columns // args.group_size, args.group_size).mul_(scale.unsqueeze(-1))
        return result
    return result.mul_(scale.reshape(-1, 1) if scale.dim() < 2 else scale)


def restored(result: tuple, args: Args) -> torch.Tensor:
    """FP32 weight of what round_weight returned: (values, scale), or NVFP4's (codes, scale, global)."""
    if args.strategy == "tensor_group":
        return fp4.dequantize(*result, args.group_size)
    return dequantize(*result, args)


def add_outer(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """total + xᵀ x (x: [tokens, features]), in place after the first batch."""
    return x.T @ x if total is None else total.addmm_(x.T, x)


class Inputs(list):
    """The batches a shared input entry keeps instead of their sum while they are the smaller."""


def gather(total, x: torch.Tensor):
    """HESSIAN's running value for one input: the batches themselves while their tokens are no more
    than their features (they then take less memory than x xᵀ), else the sum add_outer makes;
    summed(value) is the Hessian either way, with the same operations in the same order."""
    if total is None:
        total = Inputs()
    if isinstance(total, Inputs):
        if sum(batch.shape[0] for batch in total) + x.shape[0] <= x.shape[1]:
            total.append(x.clone())  # the layer's own tensor may be reused after the hook
            return total
        total = summed(total)
    return add_outer(total, x)


def summed(total):
    """The Hessian (sum of xᵀ x) of a value gather returned: batches kept are summed now, in order."""
    if not isinstance(total, Inputs):
        return total
    found = None
    for x in total:
        found = add_outer(found, x)
    return found


def sums_for_awq(layer: Layer, recipe: Recipe, seen: dict) -> dict:
    """HESSIAN's finish: AWQ reads and rescales the sums themselves, so they are summed for it; GPTQ
    alone sums each one when it rounds its Linears (the layer then never holds them all)."""
    if getattr(recipe, "awq", None) is not None:
        for entry in seen["hessian"].values():
            entry[0] = summed(entry[0])
    return {}


def finish(layer: Layer, recipe: Recipe, seen: dict) -> dict:
    """Round each Linear of the layer with its Hessian (and the imatrix_mse observer's E[x²] when the
    recipe searches scales with it); the layer then computes with its rounded weights: {"gptq":
    {module: (values, scale)}} (NVFP4: (codes, scale, global), global scales shared as vLLM fuses the
    Linears). A Linear no token reached (an expert) has no Hessian: it is rounded to nearest. With
    gptq.asymmetric (builder/quant/asymmetric.py) the leading Linears round towards the source model's
    outputs: their weights are replaced by those targets first (the Hessians summed for it).

    Memory: Linears that read the same input share one Hessian, summed when they are rounded (see
    gather), factorised once in its own memory and freed after the column loop of the last of them
    (round_weight holds the last reference); the narrowest
    Hessians go first, so the widest (down_proj's) is made when the others' Linears hold only their
    integers. Each Linear's weight is widened to FP32 (or taken, if FP32) before its Hessian is made,
    rounded in place and leaves the layer (one FP32 copy at a time); its integers stay, and the
    layer's run that hands them on makes each Linear's FP32 weight from them as it runs
    (layerwise.compute_with).
    """
    hessians = seen["hessian"]
    importance = means(seen["mean_squares"]) if "mean_squares" in seen else {}  # E[x²], builder/quant/imatrix.py
    if "cross" in seen:  # asymmetric calibration: the leading Linears round towards the source's outputs
        for name in seen["cross"]["names"] & hessians.keys():
            hessians[name][0] = summed(hessians[name][0])
        asymmetric.targets_(layer, recipe, hessians, seen["cross"])
    rounded = sorted((name for name in layer.linears if name in hessians),
                     key=lambda name: layer.linears[name].weight.shape[1])  # stable: storage order within a width
    readers = {}  # id of a shared Hessian entry -> how many Linears still need its factor
    for name in rounded:
        readers[id(hessians[name])] = readers.get(id(hessians[name]), 0) + 1
    results, factors = {}, {}
    shared = global_scales(layer, rounded) if recipe.weights.strategy == "tensor_group" else {}
    for name in rounded:
        entry, module = hessians[name], layer.linears[name]
        weight = module.weight.data.to(torch.float32)  # before a Hessian is made: the stored copy goes first
        module.weight.data = module.weight.data.new_empty(0)  # the one FP32 copy is rounded in place
        if id(entry) not in factors:
            hessian, entry[0] = summed(entry[0]), None  # the batches kept go before the factorisation
            factors[id(entry)] = factorise(hessian.to(torch.float32), recipe.gptq, name)
            del hessian  # its memory is the factor now
        readers[id(entry)] -= 1
        share = factors.get if readers[id(entry)] else factors.pop  # the last reader takes the factor along
        results[name] = round_weight(weight, share(id(entry)), recipe, importance.get(name), shared.get(name))
        del weight
        layerwise.compute_with(module, lambda result=results[name]: restored(result, recipe.weights))
    return {"gptq": results}


def global_scales(layer: Layer, names: list) -> dict:
    """NVFP4's FP32 global scale of each named Linear, from the original weights before any is rounded:
    448 * 6 / max |w| over the targeted Linears of the layer vLLM fuses with it (quantize.fused), as
    the writer's round to nearest computes it from the checkpoint."""
    maxima = {name: layer.linears[name].weight.data.abs().amax().to(torch.float32).reshape(1) for name in names}
    found = {}
    for name in names:
        members = [member for member in fused(name) if member in maxima] or [name]
        found[name] = fp4.global_scale(torch.stack([maxima[member] for member in members]).amax(dim=0))
    return found


HESSIAN = Step("hessian", (), {}, observe=lambda layer, recipe: shared_sums(layer, gather), finish=sums_for_awq)
GPTQ = Step("gptq", ("gptq",), {"algorithm": "gptq"}, needs=("hessian",), finish=finish, rewrites=True,
            spilled=True)
