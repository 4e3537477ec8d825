"""NVFP4 weights (compressed-tensors' NVFP4 and NVFP4A16 presets): FP4 E2M1 values in groups of 16 input
features, one FP8 E4M3 scale per group and one FP32 global scale per tensor, shared by the Linears vLLM
fuses (q/k/v, gate/up).

    g = global_scale(amax)                     # 448 * 6 / max |w| (over the fused Linears), FP32 [1]
    scale = group_scales(weight, g, 16)        # FP8 E4M3 [rows, columns / 16]: g * max|group| / 6, rounded
    codes = quantize_weight(weight, scale, g, 16)   # uint8 E2M1 codes 0..15 (bit 3: sign)

A value is w / (scale / g) in FP32, clamped to ±6 and rounded to the nearest E2M1 value (0, 0.5, 1, 1.5,
2, 3, 4, 6), ties to the even code, as compressed-tensors' cast_to_fp4 rounds; a negative value that
rounds to zero keeps its sign bit (code 8), as its pack_fp4_to_uint8 writes it. The reader multiplies
the E2M1 value by scale / g. Whole rows at a time: no temporary the size of the weight. GPTQ
(builder/quant/gptq.py) rounds its columns with rounded() and steps(), so its values are codes exactly.
"""

import torch

from builder import minifloat

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
# Midpoints between neighbouring magnitudes, and whether a value exactly on one rounds up (to the even code)
MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
ZERO_SCALE = 0.125  # an FP8 group scale that rounds to 0 becomes this (compressed-tensors' FP8 "eps")
CHUNK_ELEMENTS = 1 << 18


def row_slices(rows: int, columns: int) -> list:
    step = max(1, CHUNK_ELEMENTS // max(1, columns))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 [1]: 448 * 6 / amax, so the largest group scale uses FP8's range; 1 where that is not finite
    (an all-zero tensor), as compressed-tensors' generate_gparam."""
    amax = amax.to(torch.float32).reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    scale = FP8_MAX * FP4_MAX / amax
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


def group_amax(weight: torch.Tensor, group: int) -> torch.Tensor:
    """max |w| per group of `group` columns, FP32 [rows, columns / group] (exact)."""
    rows, columns = weight.shape
    return torch.cat([weight[part].abs().reshape(part.stop - part.start, columns // group, group).amax(dim=-1)
                      for part in row_slices(rows, columns)]).to(torch.float32)


def group_scales(weight: torch.Tensor, global_scale: torch.Tensor, group: int) -> torch.Tensor:
    """FP8 E4M3 [rows, columns / group]: global * (max|group| / 6), in FP32, clamped to ±448 and cast;
    a scale that rounds to 0 is 0.125."""
    return scales_from_amax(group_amax(weight, group), global_scale)


def scales_from_amax(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 group scales of group maxima (FP32): global * (amax / 6), clamped to ±448 and cast; a
    scale that rounds to 0 is 0.125 (group_scales, and the scale searches of builder/quant/observe.py)."""
    local = amax / FP4_MAX * global_scale
    scale = local.clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.where(scale.to(torch.float32) == 0, torch.tensor(ZERO_SCALE, dtype=FP8, device=scale.device), scale)


def encode(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of FP32 values already divided by their scale: magnitude index | sign << 3."""
    magnitude = scaled.abs().clamp_(max=FP4_MAX)
    index = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint, up in MIDPOINTS:
        index += (magnitude >= midpoint) if up else (magnitude > midpoint)
    return index | (torch.signbit(scaled).to(torch.uint8) << 3)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of uint8 E2M1 codes."""
    return minifloat.e2m1(codes)


def rounded(scaled: torch.Tensor) -> torch.Tensor:
    """FP32 values already divided by their scale, rounded to E2M1 as encode rounds them (its value)."""
    return decode(encode(scaled))


def steps(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP32 [rows, groups]: what one E2M1 unit of each group is worth, scale / global, as the writer
    divides by it and compressed-tensors' decompressor multiplies by it."""
    return scale.to(torch.float32) / global_scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, group: int) -> torch.Tensor:
    """FP32 [rows, columns]: each E2M1 value times its group's scale / global (what transformers loads)."""
    rows, columns = codes.shape
    values = decode(codes).view(rows, columns // group, group)
    return values.mul_(steps(scale, global_scale).unsqueeze(-1)).view(rows, columns)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                    group: int) -> torch.Tensor:
    """uint8 E2M1 codes [rows, columns]: w / (scale / global) per group, in FP32 (global None: w / scale,
    MXFP4's power-of-two scales)."""
    rows, columns = weight.shape
    divisor = scale.to(torch.float32) if global_scale is None else steps(scale, global_scale)
    codes = torch.empty((rows, columns), dtype=torch.uint8, device=weight.device)
    for part in row_slices(rows, columns):
        count = part.stop - part.start
        cells = weight[part].to(torch.float32).reshape(count, columns // group, group)
        codes[part] = encode(cells / divisor[part].unsqueeze(-1)).reshape(count, columns)
    return codes

