"""OCP microscaling weights (compressed-tensors' MXFP4 and MXFP8 presets): groups of 32 input features
sharing one power-of-two scale stored as an E8M0 exponent (uint8, bias 127); values FP4 E2M1 or FP8 E4M3.

    exponents = group_exponents(weight, 32, 4)     # uint8 [rows, columns / 32]
    codes = quantize_weight(weight, exponents, 32, 4)   # FP4: uint8 E2M1 codes; FP8: float8_e4m3fn values

The scale of a group is 2 ** (e - emax), e the exponent of max |w| rounded to the nearest power of two
when its mantissa is 1.75 or more (else down), emax that of the element type's largest value (FP4's
6: 2, FP8's 448: 8): compressed-tensors' generate_mx_scales. An all-zero group takes scale 1 (127);
exponents are clamped to E8M0's finite range, 0..254. Values are w / scale in FP32 (exact: a power of
two), clamped to the type's range and rounded (FP4 as builder/quant/fp4.py, FP8 to nearest even).
"""

import torch

from builder import minifloat
from builder.quant import fp4

GROUP = 32
BIAS = minifloat.E8M0_BIAS
ELEMENT_EXPONENT = {4: 2, 8: 8}  # floor(log2) of FP4's 6 and FP8's 448
FP8_MAX = 448.0


def group_exponents(weight: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """E8M0 exponents (uint8) [rows, columns / group] of the groups' power-of-two scales."""
    amax = fp4.group_amax(weight, group)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    power = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype)  # 1.75 * 2**(exponent - 1) rounds up
    biased = (power - ELEMENT_EXPONENT[bits] + BIAS).clamp_(0, 2 * BIAS)
    return torch.where(amax == 0, torch.full_like(biased, BIAS), biased).to(torch.uint8)


def scales(exponents: torch.Tensor) -> torch.Tensor:
    """FP32 2 ** (e - 127) of E8M0 exponents."""
    return minifloat.e8m0(exponents)


def quantize_weight(weight: torch.Tensor, exponents: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """FP4: uint8 E2M1 codes; FP8: float8_e4m3fn values; w / 2 ** (e - 127) per group, in FP32."""
    if bits == 4:
        return fp4.quantize_weight(weight, scales(exponents), None, group)
    rows, columns = weight.shape
    divisor = scales(exponents)
    values = torch.empty((rows, columns), dtype=torch.float8_e4m3fn)
    for part in fp4.row_slices(rows, columns):
        count = part.stop - part.start
        cells = weight[part].to(torch.float32).reshape(count, columns // group, group) / divisor[part].unsqueeze(-1)
        values[part] = cells.clamp_(-FP8_MAX, FP8_MAX).reshape(count, columns).to(torch.float8_e4m3fn)
    return values
