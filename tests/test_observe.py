"""Weight scale search (builder/quant/observe.py): minmax is unchanged, mse and imatrix_mse find the
least-error ratio among their candidates, deterministically."""

import pytest
import torch

from builder.quant import observe, quantize
from builder.release.recipe import Args

SCHEMES = {  # strategy -> (num_bits, type, group_size)
    "int4-group": (4, "int", "group", 16),
    "int8-channel": (8, "int", "channel", None),
    "fp8-channel": (8, "float", "channel", None),
    "fp8-tensor": (8, "float", "tensor", None),
}


def args_of(scheme: str, observer: str = "minmax", **settings) -> Args:
    bits, kind, strategy, group = SCHEMES[scheme]
    return Args.of({"num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
                    "group_size": group, "observer": observer, "observer_kwargs": settings})


def heavy_tailed(rows=24, columns=64, seed=0) -> torch.Tensor:
    """Weights with a few outliers per row: where clipping the range pays."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    outliers = torch.rand(rows, columns, generator=generator) < 0.02
    return torch.where(outliers, weight * 8, weight)


def error_of(weight, scale, args, norm, importance=None):
    """Per-cell error of rounding weight with scale, computed as plainly as possible: quantize_weight
    (the artifact's values) and a float64 sum per cell."""
    values = quantize.quantize_weight(weight, scale.float(), args).to(torch.float64)
    step = scale.to(torch.float64)
    restored = values * (step.repeat_interleave(args.group_size, dim=1) if args.strategy == "group" else step)
    error = (restored - weight.to(torch.float64)).abs() ** norm
    if importance is not None:
        error = error * (importance / importance.mean()).to(torch.float64).reshape(1, -1)
    if args.strategy == "tensor":
        return error.sum().reshape(1)
    if args.strategy == "channel":
        return error.sum(dim=1, keepdim=True)
    return error.reshape(error.shape[0], -1, args.group_size).sum(dim=-1)


def brute_force(weight, args, dtype, importance=None):
    """Every candidate ratio's error per cell, the least kept (first on ties): observe's answer with
    patience 0, computed the slow way."""
    settings = args.search
    amax = quantize.grouped_amax(weight, args)
    best, lowest = None, None
    for step in range(0, round(settings["maxshrink"] * settings["grid"]) + 1):
        scale = quantize.scale_from_amax(amax * (1 - step / settings["grid"]), args, dtype)
        error = error_of(weight, scale, args, settings["norm"], importance)
        if best is None:
            best, lowest = scale, error
        else:
            better = error < lowest
            best, lowest = torch.where(better, scale, best), torch.where(better, error, lowest)
    return best


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_minmax_gives_the_round_to_nearest_scales_unchanged(scheme):
    weight = heavy_tailed()
    args = args_of(scheme)
    assert torch.equal(observe.weight_scale(weight, args, torch.bfloat16),
                       quantize.weight_scale(weight, args, torch.bfloat16))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("observer", ["mse", "imatrix_mse"])
def test_search_without_patience_keeps_each_cells_least_error_ratio(scheme, observer):
    weight = heavy_tailed()
    importance = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(3)) + 0.1
    args = args_of(scheme, observer, patience=0, grid=20, maxshrink=0.5)
    given = importance if observer == "imatrix_mse" else None
    found = observe.weight_scale(weight, args, torch.bfloat16, given)
    assert found.dtype == torch.bfloat16 and found.shape == quantize.weight_scale(weight, args, torch.bfloat16).shape
    assert torch.equal(found, brute_force(weight, args, torch.bfloat16, given))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_searched_scales_never_round_worse_than_minmax(scheme):
    weight = heavy_tailed()
    minmax = quantize.weight_scale(weight, args_of(scheme), torch.bfloat16)
    args = args_of(scheme, "mse")
    searched = observe.weight_scale(weight, args, torch.bfloat16)
    norm = args.search["norm"]
    assert bool((error_of(weight, searched, args, norm) <= error_of(weight, minmax, args, norm)).all())
    assert bool((searched <= minmax).all())  # ratios only shrink the range
    if scheme == "int4-group":
        assert bool((searched < minmax).any())  # 4 bits with outliers: clipping pays somewhere


def test_imatrix_weights_ignore_columns_the_inputs_never_reach():
    weight = heavy_tailed(rows=4, columns=16)
    weight[:, 8:] = weight[:, :8] * 0.5  # smaller: the maxima (the candidates) stay those of the first half
    args = args_of("int8-channel", "imatrix_mse", patience=0)
    importance = torch.ones(16)
    importance[8:] = 0  # half the inputs are always zero: those weights cannot change any output
    found = observe.weight_scale(weight, args, torch.float32, importance)
    assert torch.equal(found, observe.weight_scale(weight[:, :8], args, torch.float32, importance[:8]))


def test_without_usable_importance_imatrix_searches_unweighted():
    weight = heavy_tailed()
    args = args_of("int4-group", "imatrix_mse")
    unweighted = Args.of({**args.as_dict(), "observer": "mse", "observer_kwargs": args.search})
    expected = observe.weight_scale(weight, unweighted, torch.bfloat16)
    for importance in (None, torch.zeros(weight.shape[1])):
        assert torch.equal(observe.weight_scale(weight, args, torch.bfloat16, importance), expected)


def patient(weight, args, dtype, importance=None):
    """The search with patience, one cell at a time the slow way: a cell tries ratios in order, keeps
    the least error, and stops after `patience` ratios in a row that did not lower it."""
    settings = args.search
    amax = quantize.grouped_amax(weight, args)
    steps = round(settings["maxshrink"] * settings["grid"])
    candidates = [quantize.scale_from_amax(amax * (1 - step / settings["grid"]), args, dtype) for step in range(steps + 1)]
    errors = [error_of(weight, scale, args, settings["norm"], importance) for scale in candidates]
    best = candidates[0].clone()
    for cell in range(best.numel()):
        lowest, stale = errors[0].reshape(-1)[cell], 0
        for scale, error in zip(candidates[1:], errors[1:]):
            if error.reshape(-1)[cell] < lowest:
                lowest, stale = error.reshape(-1)[cell], 0
                best.reshape(-1)[cell] = scale.reshape(-1)[cell]
            else:
                stale += 1
                if stale >= settings["patience"]:
                    break
    return best


@pytest.mark.parametrize("scheme", ["int4-group", "int8-channel", "fp8-channel"])
def test_patience_stops_each_cell_after_that_many_ratios_in_a_row_without_improvement(scheme):
    weight = heavy_tailed(rows=32, columns=128, seed=7)
    importance = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(8)) + 0.05
    for observer, given in (("mse", None), ("imatrix_mse", importance)):
        args = args_of(scheme, observer, grid=40, maxshrink=0.9, patience=2)
        found = observe.weight_scale(weight, args, torch.bfloat16, given)
        assert torch.equal(found, patient(weight, args, torch.bfloat16, given)), observer
        # patience can stop a cell before its best ratio: some cell differs from the exhaustive search
        exhaustive = args_of(scheme, observer, grid=40, maxshrink=0.9, patience=0)
        if scheme == "int4-group":
            assert not torch.equal(found, observe.weight_scale(weight, exhaustive, torch.bfloat16, given))


def test_search_is_repeatable_and_does_not_depend_on_the_thread_count():
    weight = heavy_tailed(rows=256, columns=1024)  # large enough for torch to split work between threads
    importance = torch.rand(1024, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    for scheme in ("int4-group", "fp8-tensor"):
        args = args_of(scheme, "imatrix_mse", grid=10, maxshrink=0.5)
        try:
            found = []
            for count in (1, 2, 3, 1):
                torch.set_num_threads(count)
                found.append(observe.weight_scale(weight, args, torch.bfloat16, importance))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(found[0], other) for other in found[1:]), scheme
