"""llama.cpp's Q5_0 and Q5_1 blocks, bit for bit as ggml-quants.c writes them (quantize_row_q5_*_ref without an
imatrix, quantize_row_q5_*_impl with one): the types llama-quantize's Q4_K_M / Q5_K_M presets fall back to
for tensors whose rows are not a multiple of 256 values (kmix.py), such as all of SmolLM2's but ffn_down.

    blocks = q5blocks.quantize(weight, "Q5_0", importance)   # uint8 [rows, columns / 32 * 22]

Each row is cut into blocks of 32 values, each an F16 scale d (Q5_1: and an F16 offset m), 4 bytes of fifth
bits (bit j is that of code j) and 16 bytes of low nibbles (byte j: code j | code j+16 << 4):
- Q5_0 (22 bytes): x = d (q - 16); d = the block's largest-magnitude value / -16, or with an imatrix
  make_qx_quants' weighted least-squares scale.
- Q5_1 (24 bytes): x = d q + m; d = (max - min) / 31 and m = min, or with an imatrix make_qkx3_quants' fit.
"""

import torch

from builder.quant.ksearch import (F32, affine_search, as_f16, ordered_sum, over, running_pick, sqrtf,
                                   symmetric_search)

BLOCK = 32
BLOCK_BYTES = {"Q5_0": 22, "Q5_1": 24}
CHUNK_BLOCKS = 8192  # blocks searched together: Q5_0's 19 grids x 32 x 8192 x 4 B = 20 MB a temporary
WEIGHTED_STEPS = (-0.9, 0.05, 36)  # quantize_row_q5_1_impl's make_qkx3_quants(32, 31, ..., -0.9f, 0.05f, 36)


def row_bytes(kind: str, columns: int) -> int:
    """Bytes of one row of columns values (columns a multiple of 32)."""
    return columns // BLOCK * BLOCK_BYTES[kind]


def quantize(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A [rows, columns] weight as Q5_0 or Q5_1 blocks: uint8 [rows, row_bytes].

    importance: None (llama.cpp's reference quantizer) or the imatrix FP32 [columns] (E[x_j^2] per input)."""
    x = weight.to(F32).contiguous()
    rows, columns = x.shape
    if columns % BLOCK:
        raise ValueError(f"rows of {columns} values are not a multiple of {BLOCK} ({kind})")
    step = max(1, CHUNK_BLOCKS * BLOCK // columns)
    parts = [encode(x[start:start + step], kind, importance) for start in range(0, rows, step)]
    return torch.cat(parts).reshape(rows, row_bytes(kind, columns))


def encode(x: torch.Tensor, kind: str, importance: torch.Tensor | None) -> torch.Tensor:
    """The blocks of whole rows x [rows, columns]: uint8 [rows * columns / 32, block bytes]."""
    rows, columns = x.shape
    groups = x.reshape(-1, BLOCK).T.contiguous()                        # [32, blocks], position-major
    if importance is None:
        d, m, codes = reference(groups, kind)
    else:
        sigma2 = row_mean_square(x).repeat_interleave(columns // BLOCK)  # of the whole row, not the block
        table = importance.to(F32).reshape(-1, BLOCK).repeat(rows, 1).T.contiguous()
        weights = table * sqrtf(sigma2 + groups * groups)
        if kind == "Q5_0":
            d, codes = symmetric_search(groups, 16, weights)
            m = None
        else:
            d, the_min, codes = affine_search(groups, weights, 31, WEIGHTED_STEPS, flat_below=True)
            m = -the_min
    parts = [as_f16(d)[0].reshape(-1, 1).view(torch.uint8)]
    if kind == "Q5_1":
        parts.append(as_f16(m)[0].reshape(-1, 1).view(torch.uint8))
    codes = codes.T                                                     # [blocks, 32]
    high = ((codes >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)
    qh = high.sum(dim=1, keepdim=True) >> torch.tensor([0, 8, 16, 24])
    parts += [(qh & 0xFF).to(torch.uint8), ((codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)).to(torch.uint8)]
    return torch.cat(parts, dim=1)


def row_mean_square(x: torch.Tensor) -> torch.Tensor:
    """sum_j x_j^2 / columns per row, summed in C's order in FP32."""
    return ordered_sum((x * x).T.contiguous()) / x.shape[1]


def reference(groups: torch.Tensor, kind: str) -> tuple:
    """quantize_row_q5_0_ref / q5_1_ref for [32, blocks]: (d, m or None, codes int32 [32, blocks])."""
    if kind == "Q5_0":
        magnitude = groups.abs()
        largest = torch.zeros_like(groups[0])
        peak = torch.zeros_like(groups[0])
        for i in range(BLOCK):  # the first value of the largest magnitude, signed
            take = largest < magnitude[i]
            largest = torch.where(take, magnitude[i], largest)
            peak = torch.where(take, groups[i], peak)
        d = peak / -16
        inverse = torch.where(d != 0, over(1, d), torch.zeros_like(d))
        as_int8 = ((truncate(groups * inverse + 16.5) & 0xFF) ^ 0x80) - 0x80
        return d, None, as_int8.clamp_(max=31) & 0xFF                  # MIN(31, (int8_t)(x / d + 16.5f))
    low = running_pick(groups, torch.lt)
    high = running_pick(groups, torch.gt)
    d = (high - low) / 31
    inverse = torch.where(d != 0, over(1, d), torch.zeros_like(d))
    return d, low, truncate((groups - low) * inverse + 0.5) & 0xFF      # (uint8_t)((x - min) / d + 0.5f)


def truncate(values: torch.Tensor) -> torch.Tensor:
    """C's float-to-integer conversion (toward zero), as int32."""
    return values.trunc().to(torch.int32)
