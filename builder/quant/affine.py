"""MLX's affine quantization (mx.quantize, mode "affine", its CPU kernel), bit for bit: groups of
group_size values along the input features, each with a scale and a bias (w ~ scale * q + bias),
codes packed into uint32 words value k at bits [k * bits, (k + 1) * bits). FP32 on CPU.

    packed, scales, biases = affine.quantize(weight, bits=4, group_size=64, dtype=torch.bfloat16)

The bias is the group's larger-magnitude end (its min or its max, so the scale may be negative) and
the scale is nudged so that 0.0 is exactly representable; codes are rounded (halves to even) with
the FP32 scale and bias, which are then stored in the model's dtype (tests/test_mlx.py holds all of
it to vectors from mlx 0.32.4).
"""

import torch

WORD_BITS = 32
MIN_SCALE = 1e-7  # mlx: a group of equal values still gets a non-zero scale


def quantize(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> tuple:
    """(uint32 [rows, columns * bits / 32], scales [rows, columns / group_size], biases) of a
    [rows, columns] weight; scales and biases in dtype."""
    rows, columns = weight.shape
    groups = weight.to(torch.float32).reshape(rows, columns // group_size, group_size)
    bins = float((1 << bits) - 1)
    high, low = groups.amax(dim=-1), groups.amin(dim=-1)
    low_wins = low.abs() > high.abs()
    scale = ((high - low) / bins).clamp_(min=MIN_SCALE)
    scale = torch.where(low_wins, scale, -scale)
    edge = torch.where(low_wins, low, high)
    steps = torch.round(edge / scale)
    representable = steps != 0
    scale = torch.where(representable, edge / steps, scale)  # so that 0.0 is scale * q + bias for a whole q
    bias = torch.where(representable, edge, torch.zeros_like(edge))
    codes = torch.round((groups - bias[..., None]) / scale[..., None]).clamp_(0, bins)
    return pack(codes.reshape(rows, columns), bits), scale.to(dtype), bias.to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, columns] (floats or integers) as uint32 words, little end first."""
    per_word = WORD_BITS // bits
    rows, columns = codes.shape
    values = codes.to(torch.int64).reshape(rows, columns // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (values << shifts).sum(dim=-1)
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return signed.view(torch.uint32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of pack(), as int64 [rows, columns]."""
    per_word = WORD_BITS // bits
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """FP32 weights scale * q + bias (the stored scale and bias, each exact in FP32)."""
    codes = unpack(packed, bits).to(torch.float32)
    rows, columns = codes.shape
    group_size = columns // scales.shape[1]
    grouped = codes.reshape(rows, -1, group_size)
    return (scales.to(torch.float32)[..., None] * grouped + biases.to(torch.float32)[..., None]).reshape(rows, columns)
