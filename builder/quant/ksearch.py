"""The scale searches of llama.cpp's K-quants, bit for bit: ggml-quants.c's nearest_int, make_qkx2_quants /
make_qkx3_quants (affine_search), make_qp_quants (positive_search) and make_qx_quants (symmetric_search).

Every search takes its groups position-major, x[i, g] = value i of group g (FP32), and returns for each
group what the C function returns, with its codes. The C code runs one group at a time; here each loop step
is one tensor operation over every group. Sums run over a group's values in C's order, every product and sum
is rounded to FP32 on its own (ggml-base is built without FMA on x86-64, so nothing is contracted), and the
one square root is correctly rounded, so the results equal the C code's.
"""

import torch

F32 = torch.float32
GROUP_MAX_EPS = 1e-15   # ggml-quants.c: a group whose largest value is below this is all zero
MAGIC = 12582912.0      # 1.5 * 2**23: adding it rounds an FP32 value to an integer (nearest_int)


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """nearest_int: FP32 values rounded half to even through the float's bits (int32), and out of its
    range (|v| > 2**22, inf, NaN) the same bits the C function makes of them."""
    bits = (values.to(F32) + MAGIC).view(torch.int32)
    return (bits & 0x7FFFFF) - 0x400000


def as_f16(values: torch.Tensor) -> tuple:
    """GGML_FP32_TO_FP16, round to nearest even: (the F16 values, the same back in FP32)."""
    half = values.to(torch.float16)
    return half, half.to(F32)


def sqrtf(values: torch.Tensor) -> torch.Tensor:
    """C's sqrtf: correctly rounded (FP64's root rounded to FP32 is; FP32 sqrt on some CPUs is not)."""
    return torch.sqrt(values.to(torch.float64)).to(F32)


def ordered_sum(terms: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """terms[0] + terms[1] + ... in this order, in FP32, from 0 as C's `float s = 0; s += t` loops do
    (from_first: starting at terms[0], as make_qkx's sum_w and sum_x do; only the sign of a zero differs)."""
    total = terms[0].clone() if from_first else torch.zeros_like(terms[0])
    for term in terms[1:] if from_first else terms:
        total += term
    return total


def running_pick(values: torch.Tensor, better) -> torch.Tensor:
    """values[0], then each values[i] that better(values[i], current) prefers, in order (C's min/max loops)."""
    current = values[0].clone()
    for value in values[1:]:
        current = torch.where(better(value, current), value, current)
    return current


def affine_search(x: torch.Tensor, weights: torch.Tensor, nmax: int, steps: tuple, flat_below: bool) -> tuple:
    """make_qkx2_quants / make_qkx3_quants (use_mad false) for x, weights [n, groups]: codes 0..nmax and
    x ~ scale * code - the_min, chosen among nstep + 1 grids by the weighted squared error.

    Args:
        steps: (rmin, rdelta, nstep) of the C call: grid k has iscale = (rmin + rdelta k + nmax) / (max - min).
        flat_below: make_qkx3's `max <= min` test for a flat group, instead of make_qkx2's `max == min`.
    Returns:
        (scale [groups], the_min [groups], codes int32 [n, groups]).
    """
    rmin, rdelta, nstep = steps
    low = running_pick(x, torch.lt)
    high = running_pick(x, torch.gt)
    sum_w = ordered_sum(weights, from_first=True)
    sum_x = ordered_sum(weights * x, from_first=True)
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high <= low if flat_below else high == low
    iscale = over(nmax, high - low)
    scale = over(1, iscale)
    codes = nearest_int(iscale * (x - low)).clamp_(0, nmax)
    best = ordered_sum(weights * squared(scale * codes.to(F32) + low - x))
    offset = low
    grid = torch.arange(nstep + 1, dtype=F32) * torch.tensor(rdelta, dtype=F32) + torch.tensor(rmin, dtype=F32)
    for factor in grid + float(nmax):  # each grid spans max - min of the best fit so far (C updates min)
        trial = nearest_int(factor / (high - offset) * (x - offset)).clamp_(0, nmax).to(F32)
        weighted = weights * trial                                      # w*l
        sum_l = ordered_sum(weighted)
        sum_l2 = ordered_sum(weighted * trial)
        sum_xl = ordered_sum(weighted * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = trial_min > 0  # the fit wants a positive offset: refit through zero
        trial_min = torch.where(positive, torch.zeros_like(trial_min), trial_min)
        trial_scale = torch.where(positive, sum_xl / sum_l2, trial_scale)
        error = ordered_sum(weights * squared(trial_scale * trial + trial_min - x))
        take = (det > 0) & (error < best)
        codes = torch.where(take, trial.to(torch.int32), codes)
        best = torch.where(take, error, best)
        scale = torch.where(take, trial_scale, scale)
        offset = torch.where(take, trial_min, offset)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    offset = torch.where(flat, low, offset)
    return scale, -offset, codes


def over(numerator: float, values: torch.Tensor) -> torch.Tensor:
    """numerator / values in FP32, one rounding (Python's `n / tensor` multiplies by a reciprocal)."""
    return torch.div(torch.full_like(values, numerator), values)


def squared(values: torch.Tensor) -> torch.Tensor:
    """values * values, rounded once (C's `diff = diff * diff`)."""
    return values * values


def positive_search(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple:
    """make_qp_quants for x, weights [n, groups]: codes 0..nmax with x ~ scale * code, the scale chosen
    among 9 grids by the weighted squared error, then up to 5 passes that move one code at a time.

    Returns:
        (scale [groups], codes [n, groups] as the C code's uint8_t L holds them, 0..255).
    """
    top = torch.zeros_like(x[0])
    for value in x:  # C's MAX(max, x[i]) = max > x[i] ? max : x[i], from max = 0
        top = torch.where(top > value, top, value)
    zero = top < GROUP_MAX_EPS
    iscale = over(nmax, top)
    codes = nearest_int(iscale * x) & 0xFF
    scale = over(1, iscale)
    best = ordered_sum(weighted_square(weights, x - scale * codes.to(F32)))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_iscale = (torch.tensor(0.1, dtype=F32) * step + float(nmax)) / top
        trial_scale = over(1, trial_iscale)
        trial = nearest_int(trial_iscale * x).clamp_(max=nmax)
        error = ordered_sum(weighted_square(weights, x - trial_scale * trial.to(F32)))
        take = error < best
        best = torch.where(take, error, best)
        iscale = torch.where(take, trial_iscale, iscale)
    chosen = nearest_int(iscale * x).clamp_(max=nmax)
    codes = chosen & 0xFF
    wx = weights * x
    sumlx = ordered_sum(wx * chosen.to(F32))
    suml2 = ordered_sum(weights * chosen.to(F32) * chosen.to(F32))
    for _ in range(5):  # a pass that changes nothing leaves the state as it was: C's early break
        for i in range(x.shape[0]):
            held = codes[i].to(F32)
            slx = sumlx - wx[i] * held
            sl2 = suml2 - weights[i] * held * held
            moved = nearest_int(x[i] * sl2 / slx).clamp_(max=nmax)
            moved_f = moved.to(F32)
            tried = (slx > 0) & (sl2 > 0) & (moved != codes[i])
            slx = slx + wx[i] * moved_f
            sl2 = sl2 + weights[i] * moved_f * moved_f
            take = tried & (slx * slx * suml2 > sumlx * sumlx * sl2)
            codes[i] = torch.where(take, moved & 0xFF, codes[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(codes), codes)


def weighted_square(weights: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """w * diff * diff in C's order, (w * diff) * diff (make_qp_quants' error terms)."""
    return weights * diff * diff


def symmetric_search(x: torch.Tensor, nmax: int, weights: torch.Tensor | None) -> tuple:
    """make_qx_quants(n, nmax, x, L, rmse_type 1, qw) for x [n, groups]: codes 0..2 nmax - 1 for
    x ~ scale * (code - nmax), the best of 19 grids by sum w x l / sum w l^2 (w = qw, or x^2 without).

    Returns:
        (scale [groups], codes int32 [n, groups]; a group of zeros gets scale 0 and codes 0).
    """
    magnitude = x.abs()
    peak = x[0].clone()
    reached = magnitude[0].clone()
    for i in range(1, x.shape[0]):  # the signed value of the first element reaching the largest |x|
        take = magnitude[i] > reached
        peak = torch.where(take, x[i], peak)
        reached = torch.where(take, magnitude[i], reached)
    zero = reached < GROUP_MAX_EPS
    weights = x * x if weights is None else weights
    tenth = torch.tensor(0.1, dtype=F32)
    factors = torch.stack([torch.tensor(float(nmax))] + [float(nmax) + tenth * step
                                                          for step in range(-9, 10) if step])
    iscales = -factors[:, None] / peak                                                # [19, groups]
    grids = nearest_int(iscales[None] * x[:, None]).clamp_(-nmax, nmax - 1)         # [n, 19, groups]
    levels = grids.to(F32)
    sumlx = ordered_sum(weights[:, None] * x[:, None] * levels)
    suml2 = ordered_sum(weights[:, None] * levels * levels)
    codes = grids[:, 0]
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(sumlx[0]))
    best = scale * sumlx[0]
    for k in range(1, factors.shape[0]):
        take = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
        codes = torch.where(take, grids[:, k], codes)
        scale = torch.where(take, sumlx[k] / suml2[k], scale)
        best = torch.where(take, scale * sumlx[k], best)
    codes = torch.where(zero, torch.zeros_like(codes), codes + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes
