"""GPTQ (Frantar et al., 2022) as two calibration steps: each targeted Linear's input second moments
(HESSIAN: sum of x xᵀ, also read by AWQ), then each Linear rounded column by column with the error
compensated on the columns not yet rounded (GPTQ), the layer run again on its rounded weights so the
next layer sees quantized outputs. Deterministic, FP32, on the weight's device; results spilled to disk
layer by layer (builder/spill.py).

    values, scale = gptq.quantize(weight, hessian, Recipe.of(spec["quant"]))
    found["gptq"][module] -> (values, scale)      (NVFP4: (E2M1 codes, FP8 group scales, FP32 global scale))
"""

from dataclasses import dataclass

import torch

from builder.errors import BuilderError, Problem
from builder.quant import fp4, layerwise, observe
from builder.quant.quantize import FP8, fused, quantize_weight, scale_format
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
    are rounded in, the inputs never seen (in that order), and the upper Cholesky factor of the
    dampened inverse Hessian (permuted), held in the Hessian's own memory."""

    order: torch.Tensor
    dead: torch.Tensor
    inverse: torch.Tensor


def factorise(hessian: torch.Tensor, settings, module: str) -> Factor:
    """The Factor of a Hessian (FP32, [columns, columns]), computed in its memory: the Hessian is
    consumed. The same values meet the same operations as H[order][:, order], then cholesky,
    cholesky_inverse and an upper cholesky on fresh tensors would: only no copy is made."""
    order = column_order(hessian, settings.actorder)
    if settings.actorder is not None:
        permute_(hessian, order)
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    # the eye's off-diagonal zeros added nothing: the dampening goes on the diagonal alone
    hessian.diagonal().add_(settings.dampening_frac * torch.mean(torch.diag(hessian)))
    return Factor(order, dead, inverse_hessian(hessian, settings.dampening_frac, module))


def round_weight(weight: torch.Tensor, factor: Factor, recipe: Recipe,
                 importance: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> tuple:
    """GPTQ's column loop on one Linear's FP32 weight (consumed: rounded in its own memory) with the
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
    order = factor.order
    if recipe.gptq.actorder is not None:
        permute_columns_(weight, order)
    weight[:, factor.dead] = 0
    column_loop(weight, factor.inverse, order, steps_of, args, block)
    del factor  # given the last reference (finish pops it), the Hessian's memory goes before the integers are made
    if recipe.gptq.actorder is not None:
        permute_columns_(weight, torch.argsort(order))  # back to storage order: scales and layout are unchanged
    if fp4_groups:  # each value is an E2M1 value times its step already: the codes are those values'
        return fp4.quantize_weight(weight, scale, global_scale, args.group_size), scale, global_scale
    return quantize_weight(weight, scale.to(torch.float32), args), scale


def column_loop(weight: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor, steps_of, args: Args,
                block: int) -> None:
    """GPTQ's blocked column loop, in place on the FP32 weight (columns in order), with the upper
    factor U of the permuted inverse Hessian; steps_of (column_steps) gives the columns' scales."""
    q_min, q_max = args.value_range
    columns = weight.shape[1]
    single = weight.device.type == "cpu"
    threads = torch.get_num_threads()
    for start in range(0, columns, block):
        end = min(start + block, columns)
        # the block's columns as contiguous rows (and its scales): each step reads and updates
        # contiguous memory; the same values meet the same operations, so the bytes are unchanged
        chunk, steps = weight[:, start:end].T.contiguous(), steps_of(order[start:end])
        errors, local, product = torch.zeros_like(chunk), inverse[start:end, start:end], torch.empty_like(chunk)
        if single:  # elementwise work on a few MB: one thread, no fork-join per column (same bytes)
            torch.set_num_threads(1)
        try:
            for i in range(end - start):
                column, step = chunk[i], steps[i]
                rounded = round_column(column, step, args, q_min, q_max)
                error = (column - rounded) / local[i, i]
                update = product[: end - start - i]
                torch.mul(local[i, i:].unsqueeze(1), error.unsqueeze(0), out=update)
                chunk[i:] -= update
                chunk[i] = rounded
                errors[i] = error
        finally:
            torch.set_num_threads(threads)
        weight[:, start:end] = chunk.T
        del chunk, product
        # in place (beta 1, alpha -1): each value minus the same product, no [rows, columns] temporary
        weight[:, end:].addmm_(errors.T.contiguous(), inverse[start:end, end:], alpha=-1)


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


def round_column(column: torch.Tensor, step: torch.Tensor, args: Args, q_min: float, q_max: float) -> torch.Tensor:
    """One column rounded to the grid and scaled back (FP32): integers round half to even; FP8
    clamps to ±448 and casts to E4M3 (round to nearest even); FP4 clamps to ±6 and rounds to E2M1
    (builder/quant/fp4.py), as the artifact's values are made."""
    if args.type == "float" and args.num_bits == 4:
        return fp4.rounded(column / step) * step
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


def inverse_hessian(hessian: torch.Tensor, dampening: float, module: str) -> torch.Tensor:
    """Upper Cholesky factor U of the inverse of a (dampened) Hessian H (H⁻¹ = UᵀU), computed in the
    Hessian's memory: the returned tensor is a column-major view of it.

    With J the reversal (J H J reverses H's rows and columns) and L the lower Cholesky factor of J H J,
    H⁻¹ = J L⁻ᵀ L⁻¹ J = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular: U is one Cholesky and one
    triangular inverse away, not a Cholesky, LAPACK's cholesky_inverse (slow here) and a second
    Cholesky. LAPACK reads the lower triangle of the column-major view, which is the row-major upper
    one: it is filled with H's lower triangle turned half a turn, which is J H J's."""
    turned_lower_onto_upper_(hessian)
    factor = hessian.mT  # column-major: LAPACK's own layout, so torch copies nothing
    try:
        torch.linalg.cholesky(factor, out=factor)
    except RuntimeError:
        raise BuilderError(Problem("quant", "gptq.dampening_frac", f"{dampening}: the Hessian of {module} "
                                   "is not positive definite; raise dampening_frac or calibrate on more "
                                   "samples")) from None
    invert_lower_(factor)
    turn_(hessian)  # J X J of X = L⁻¹ (a half turn of the square): upper triangular
    return factor


INVERT_BLOCK = 128  # columns of L⁻¹ made at a time by invert_lower_


def invert_lower_(lower: torch.Tensor) -> None:
    """L⁻¹ in L's memory, for a lower triangular L with zeros above its diagonal: LAPACK trtri's
    blocked order, last column block first. With the columns right of block j already inverted
    (X₂₂ = L₂₂⁻¹, lower triangular, zeros above), block j's rows below its diagonal block become
    -X₂₂ L₂₁ L₁₁⁻¹ and the diagonal block L₁₁⁻¹. The only scratch is one block of columns."""
    size = lower.shape[0]
    for start in reversed(range(0, size, INVERT_BLOCK)):
        end = min(start + INVERT_BLOCK, size)
        diagonal = lower[start:end, start:end]
        inverse = torch.linalg.solve_triangular(diagonal, torch.eye(end - start, dtype=lower.dtype,
                                                                    device=lower.device), upper=False)
        if end < size:
            below = lower[end:, start:end]
            below.copy_(torch.mm(torch.mm(lower[end:, end:], below), inverse).neg_())
        diagonal.copy_(inverse)


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
    Linears). A Linear no token reached (an expert) has no Hessian: it is rounded to nearest.

    Memory: Linears that read the same input share one Hessian, summed when they are rounded (see
    gather), factorised once in its own memory and freed after the column loop of the last of them
    (before its integers are made: round_weight holds the last reference); the narrowest
    Hessians go first, so the widest (down_proj's) is made when the others' Linears hold only their
    integers. Each Linear's weight is widened to FP32 (or taken, if FP32) before its Hessian is made,
    rounded in place and leaves the layer (one FP32 copy at a time); its integers stay, and the
    layer's run that hands them on makes each Linear's FP32 weight from them as it runs
    (layerwise.compute_with).
    """
    hessians = seen["hessian"]
    importance = means(seen["mean_squares"]) if "mean_squares" in seen else {}  # E[x²], builder/quant/imatrix.py
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
        members = [member for member in fused(name, layer.family) if member in maxima] or [name]
        found[name] = fp4.global_scale(torch.stack([maxima[member] for member in members]).amax(dim=0))
    return found


HESSIAN = Step("hessian", (), {}, observe=lambda layer, recipe: shared_sums(layer, gather), finish=sums_for_awq)
GPTQ = Step("gptq", ("gptq",), {"algorithm": "gptq"}, needs=("hessian",), finish=finish, rewrites=True,
            spilled=True)
