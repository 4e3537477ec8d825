"""MLX's floating-point quantization modes (mx.quantize, modes mxfp4, nvfp4, mxfp8: its CPU path), bit for bit:
groups along the input features, one uint8 scale per group, no bias, codes packed into uint32 words.

    packed, scales, _ = mlxfp.quantize(weight, bits=4, group_size=32, dtype=torch.bfloat16)   # mxfp4

    mxfp4  4 bits, groups of 32: FP4 E2M1 codes, E8M0 power-of-two scales (uint8, bias 127)
    nvfp4  4 bits, groups of 16: FP4 E2M1 codes, FP8 E4M3 scales (no global scale: mlx-lm's dense Linears)
    mxfp8  8 bits, groups of 32: FP8 E4M3 values, E8M0 scales

mlx computes in the weight's dtype, so this does too: scale = max|w| / 6 (FP4) or / 448 (FP8) rounded to
the dtype. MX: the exponent is the smallest e with 2**e >= scale (mlx 0.32.4 rounds the block scale up, so
no value saturates), 0 for an all-zero group; values are w / 2**e. NVFP4: the scale is cast to E4M3
(nearest even, saturating at 448) and values are w / scale rounded to the dtype. FP4 codes are the nearest
E2M1 value, ties to the smaller magnitude, and a negative value that rounds to zero is +0 (code 0): mlx
takes the first minimum of |v - LUT| (the rules of builder/quant/fp4.py, compressed-tensors', differ: ties
to even, signed zeros). A quotient that is not finite (an NVFP4 scale that rounds to 0) gives code 0.
FP8 values are cast as torch casts (the same nearest-even rule as mlx's ToFP8, which saturates at 448).
tests/test_mlx_modes.py holds all of it to vectors from mlx 0.32.4 (bench/reference_vectors.py).
Not reproduced: E8M0 exponents outside -127..127 (max |w| below 6 * 2**-127 or above 2**127; mlx wraps
them), and float16 weights whose 2**e underflows float16 (max |w| under 2**-25 x 6 or x 448).
"""

import torch

from builder.quant import affine, fp4, mx

# (bits, group_size) -> mode: mx.quantize takes exactly these (mlx_lm.utils.infer_quant_config reads them back)
MODES = {(4, 32): "mxfp4", (4, 16): "nvfp4", (8, 32): "mxfp8"}
ELEMENT_MAX = {4: 6.0, 8: 448.0}
FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between neighbouring E2M1 magnitudes
FP8 = torch.float8_e4m3fn
E8M0_LIMIT = 127


def quantize(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> tuple:
    """(uint32 [rows, columns * bits / 32], uint8 scales [rows, columns / group_size], None) of a
    [rows, columns] weight, rounded in dtype as mlx rounds a weight of that dtype."""
    mode = MODES[(bits, group_size)]
    rows, columns = weight.shape
    count = columns // group_size
    codes = torch.empty((rows, columns), dtype=torch.uint8)
    scales = torch.empty((rows, count), dtype=torch.uint8)
    for part in fp4.row_slices(rows, columns):
        groups = weight[part].to(dtype).reshape(-1, count, group_size)
        scale = (groups.abs().amax(dim=-1).to(torch.float32) / ELEMENT_MAX[bits]).to(dtype).to(torch.float32)
        if mode == "nvfp4":
            stored = scale.clamp(max=fp4.FP8_MAX).to(FP8)
            divisor, scales[part] = stored.to(torch.float32), stored.view(torch.uint8)
        else:
            exponent = ceil_log2(scale)
            divisor, scales[part] = torch.ldexp(torch.ones_like(scale), exponent), (exponent + mx.BIAS).to(torch.uint8)
        values = (groups.to(torch.float32) / divisor[..., None]).to(dtype).to(torch.float32)
        codes[part] = (e2m1(values) if bits == 4 else fp8(values)).reshape(-1, columns)
    return affine.pack(codes, bits), scales, None


def ceil_log2(scale: torch.Tensor) -> torch.Tensor:
    """int32 smallest e with 2**e >= scale (exact, from the binary exponent), 0 where scale is 0; clamped to E8M0."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    ceiling = exponent - (mantissa == 0.5).to(exponent.dtype)
    ceiling = torch.where(scale == 0, torch.zeros_like(ceiling), ceiling)
    return ceiling.clamp_(-E8M0_LIMIT, E8M0_LIMIT).to(torch.int32)


def e2m1(values: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes of FP32 values (already divided by their scale), as mlx's argmin over its LUT picks them."""
    magnitude = values.abs()
    index = torch.zeros(values.shape, dtype=torch.uint8)
    for midpoint in FP4_MIDPOINTS:
        index += magnitude > midpoint  # a tie keeps the smaller magnitude (the LUT's first minimum)
    negative = (values < 0) & (index > 0)  # -0 is never chosen: +0 comes first in the LUT
    codes = index | (negative.to(torch.uint8) << 3)
    return torch.where(torch.isfinite(values), codes, torch.zeros_like(codes))


def fp8(values: torch.Tensor) -> torch.Tensor:
    """uint8 FP8 E4M3 codes of FP32 values, nearest even, saturating at ±448."""
    return values.clamp(-mx.FP8_MAX, mx.FP8_MAX).to(FP8).view(torch.uint8)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None, bits: int) -> torch.Tensor:
    """FP32 weights of any mlx mode, as mlx-lm tells them apart: affine when there are biases, else the
    mode of (bits, group size). Exact: every product of a code and a scale fits FP32."""
    if biases is not None:
        return affine.dequantize(packed, scales, biases, bits)
    codes = affine.unpack(packed, bits).to(torch.uint8)
    rows, columns = codes.shape
    group_size = columns // scales.shape[1]
    mode = MODES[(bits, group_size)]
    values = fp4.decode(codes) if bits == 4 else codes.view(FP8).to(torch.float32)
    scale = scales.view(FP8).to(torch.float32) if mode == "nvfp4" else mx.scales(scales)
    return (values.reshape(rows, -1, group_size) * scale[..., None]).reshape(rows, columns)
