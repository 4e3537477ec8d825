"""Block-wise FP8 weights (compressed-tensors' FP8_BLOCK, DeepSeek-V3's `weight_block_size`): one scale per
[rows, columns] block of a weight, max |w| of the block / 448, values round(w / scale) in FP8 E4M3.

    amax = block_amax(weight, [128, 128])                  # [ceil(rows/128), ceil(columns/128)], FP32
    values = quantize_weight(weight, scale.float(), [128, 128])   # scale: quantize.scale_from_amax(amax)

Edges: a weight whose rows or columns are not multiples of the block has partial blocks at its bottom
and right edges, each with a scale of its own over the values it holds (compressed-tensors pads with
zeros, which leave a maximum unchanged, and truncates). One band of block rows at a time: no temporary
the size of the weight. Deterministic: maxima are exact, and each value meets one division in FP32.
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value


def bands(rows: int, height: int) -> list:
    """Slices of `height` rows (the last may be shorter): one row of blocks each."""
    return [slice(start, min(start + height, rows)) for start in range(0, rows, height)]


def block_amax(weight: torch.Tensor, block: list) -> torch.Tensor:
    """Largest magnitude per block, FP32 [ceil(rows/height), ceil(columns/width)] (exact: a max)."""
    height, width = block
    rows, columns = weight.shape
    blocks = -(-columns // width)
    maxima = []
    for band in bands(rows, height):
        magnitudes = weight[band].abs()
        if columns % width:
            magnitudes = torch.nn.functional.pad(magnitudes, (0, blocks * width - columns))
        maxima.append(magnitudes.reshape(band.stop - band.start, blocks, width).amax(dim=(0, 2)))
    return torch.stack(maxima).to(torch.float32)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, block: list) -> torch.Tensor:
    """FP8 E4M3 values: w / scale of its block, in FP32, clamped to ±448, cast (round to nearest even).

    scale: FP32 [ceil(rows/height), ceil(columns/width)], exactly as stored."""
    height, width = block
    rows, columns = weight.shape
    values = torch.empty((rows, columns), dtype=FP8)
    for index, band in enumerate(bands(rows, height)):
        divisor = scale[index].repeat_interleave(width)[:columns]
        values[band] = (weight[band].to(torch.float32) / divisor).clamp_(-FP8_MAX, FP8_MAX)
    return values

