"""llama.cpp's K-quant blocks Q4_K, Q5_K and Q6_K, bit for bit as ggml-quants.c writes them: the reference
quantizers (quantize_row_q*_K_ref, what llama-quantize runs without an imatrix) and the importance-weighted
ones (quantize_row_q*_K_impl, with --imatrix). FP32 on CPU, vectorised over blocks.

    blocks = kquants.quantize(weight, "Q4_K", importance)   # uint8 [rows, columns / 256 * 144]

Each row is cut into super-blocks of 256 values along the input features, stored one after the other:
- Q4_K (144 bytes): F16 d, F16 dmin, 12 bytes of 6-bit scales and mins of its 8 sub-blocks of 32, 128 bytes
  of nibbles; x = d sc q - dmin m, q in 0..15.
- Q5_K (176 bytes): as Q4_K, with 32 bytes of fifth bits (qh) before the 128 bytes of low nibbles.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales of its 16
  sub-blocks of 16, F16 d; x = d sc (q - 32), q in 0..63.
quantize() also writes the other types llama-quantize's K_M presets choose (builder/formats/kmix.py) but F16:
Q5_0 and Q5_1 (q5blocks.py) and Q8_0 (ggml.py); blocks() adds Q4_0 (ggml.py): every type format gguf writes.
The searches are in ksearch.py; tests/test_kquants.py holds the bytes to vectors from llama.cpp's C code.
"""

import torch

from builder.quant import ggml, q5blocks
from builder.quant.ksearch import (F32, GROUP_MAX_EPS, affine_search, as_f16, nearest_int, ordered_sum,
                                   over, positive_search, running_pick, sqrtf, symmetric_search)

QK_K = 256                                              # values per super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
AFFINE = {  # kind: (nmax, (rmin, rdelta, nstep) without an imatrix, the same with one), as ggml-quants.c
    "Q4_K": (15, (-1.0, 0.1, 20), (-0.9, 0.05, 36)),
    "Q5_K": (31, (-0.5, 0.1, 15), (-0.9, 0.05, 36)),
}
CHUNK = 1024  # super-blocks searched together: Q6_K's 19 grids x 16 x 16384 groups x 4 B = 20 MB a temporary


def row_bytes(kind: str, columns: int) -> int:
    """Bytes of one row of columns values (columns a multiple of 256; of 32 for the types of 32)."""
    if kind in q5blocks.BLOCK_BYTES:
        return q5blocks.row_bytes(kind, columns)
    if kind == "Q8_0":
        return ggml.row_bytes(kind, columns)
    return columns // QK_K * BLOCK_BYTES[kind]


def quantize(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A [rows, columns] weight as llama.cpp blocks of kind: uint8 [rows, row_bytes(kind, columns)].

    kind: Q4_K, Q5_K or Q6_K; or any other type kmix.tensor_type chooses but F16: Q5_0 and Q5_1
    (q5blocks.py) and Q8_0 (ggml.py; llama.cpp's Q8_0 ignores the imatrix, so does this).

    Args:
        weight: any float dtype, converted to FP32 (llama-quantize quantizes from FP32); columns % 256 == 0.
        importance: None for llama.cpp's reference quantizer, or the imatrix of this weight: FP32 [columns],
            the mean of x_j^2 per input feature (what llama-imatrix stores), for the weighted searches.
    """
    if kind in q5blocks.BLOCK_BYTES:
        return q5blocks.quantize(weight, kind, importance)
    if kind == "Q8_0":
        return ggml.quantize(weight, kind)
    if kind not in BLOCK_BYTES:
        raise ValueError(f"unknown llama.cpp type {kind!r}: one of {sorted([*BLOCK_BYTES, *q5blocks.BLOCK_BYTES, 'Q8_0'])}")
    x = weight.to(F32).contiguous()
    rows, columns = x.shape
    if columns % QK_K:
        raise ValueError(f"rows of {columns} values are not a multiple of {QK_K} ({kind})")
    blocks = x.reshape(-1, QK_K)
    per_row = columns // QK_K
    table = None if importance is None else importance.to(F32).reshape(per_row, QK_K)
    encode = q6_k if kind == "Q6_K" else affine_blocks
    parts = []
    for start in range(0, blocks.shape[0], CHUNK):
        stop = min(start + CHUNK, blocks.shape[0])
        weights = None if table is None else table[torch.arange(start, stop) % per_row]
        parts.append(encode(blocks[start:stop], weights, kind))
    return torch.cat(parts).reshape(rows, row_bytes(kind, columns))


def blocks(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A weight as llama.cpp blocks of any type the GGUF writer quantizes to: Q8_0 and Q4_0 (ggml.py; Q4_0
    importance-weighted with an imatrix), and every type quantize() writes. Format gguf's rounding."""
    if kind in ggml.BLOCK_BYTES:
        return ggml.quantize(weight, kind, importance)
    return quantize(weight, kind, importance)


def affine_blocks(x: torch.Tensor, importance: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Q4_K or Q5_K blocks of x [m, 256]: a scale and a min per sub-block of 32, both 6-bit multiples of
    the super-block's F16 d and dmin."""
    nmax, plain, weighted = AFFINE[kind]
    m = x.shape[0]
    sub = by_position(x, 32)                                       # [32, sub-blocks]
    if importance is None:  # quantize_row_q*_K_ref
        av_x = sqrtf(ordered_sum(sub * sub) / 32)
        scales, mins, codes = affine_search(sub, av_x + sub.abs(), nmax, plain, flat_below=False)
        ls, lm, d, dmin = scale_codes(by_position(scales, 8), by_position(mins, 8))
    else:                   # quantize_row_q*_K_impl
        sigma2 = 2 * ordered_sum(by_position(x * x, QK_K)) / QK_K          # per super-block
        sigma2 = sigma2.repeat_interleave(8)
        weights = by_position(importance, 32) * sqrtf(sigma2 + sub * sub)
        scales, mins, codes = affine_search(sub, weights, nmax, weighted, flat_below=True)
        total = by_position(ordered_sum(weights), 8)                      # sw: each sub-block's weight
        d, ls = positive_search(by_position(scales, 8), 63, total)
        dmin, lm = positive_search(by_position(mins, 8), 63, total)
        if kind == "Q5_K":  # quantize_row_q5_K_impl clamps them, q4_K's does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = pack_scales(ls.T, lm.T)                                    # [m, 12]
    d16, d32 = as_f16(d)
    dmin16, dmin32 = as_f16(dmin)
    sc, mn = unpack_scales(packed)                                      # [m, 8] as get_scale_min_k4 reads
    step = d32[:, None] * sc.to(F32)
    shift = dmin32[:, None] * mn.to(F32)
    final = nearest_int((x.reshape(m, 8, 32) + shift[..., None]) / step[..., None]).clamp_(0, nmax)
    searched = codes.T.reshape(m, 8, 32)
    codes = torch.where((step != 0)[..., None], final, searched).reshape(m, QK_K)  # d == 0: the search's codes
    head = [d16.reshape(m, 1).view(torch.uint8), dmin16.reshape(m, 1).view(torch.uint8), packed]
    if kind == "Q4_K":
        return torch.cat(head + [nibbles(codes)], dim=1)
    return torch.cat(head + [fifth_bits(codes), nibbles(codes & 0xF)], dim=1)


def by_position(values: torch.Tensor, n: int) -> torch.Tensor:
    """Groups of n consecutive values as the searches take them, position-major and contiguous: [n, groups]
    (contiguous so that each step of an ordered sum reads one row)."""
    return values.reshape(-1, n).T.contiguous()


def scale_codes(scales: torch.Tensor, mins: torch.Tensor) -> tuple:
    """The reference quantizers' 6-bit sub-block scales and mins from [8, m]: multiples of the largest over
    63 (ls, lm int32 [8, m], d, dmin [m])."""
    largest_scale = running_pick(torch.cat([torch.zeros_like(scales[:1]), scales]), torch.gt)
    largest_min = running_pick(torch.cat([torch.zeros_like(mins[:1]), mins]), torch.gt)
    inverse_scale = torch.where(largest_scale > 0, over(63, largest_scale), torch.zeros_like(largest_scale))
    inverse_min = torch.where(largest_min > 0, over(63, largest_min), torch.zeros_like(largest_min))
    ls = (nearest_int(inverse_scale * scales) & 0xFF).clamp_(max=63)   # uint8_t, then MIN(63, .)
    lm = (nearest_int(inverse_min * mins) & 0xFF).clamp_(max=63)
    return ls, lm, largest_scale / 63, largest_min / 63


def pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [m, 8] (values 0..255 as uint8_t holds them) in Q4_K's 12 bytes: bytes
    0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 the low nibbles of scale/min 4-7, and their top two bits
    in the top two bits of bytes 0-7."""
    low = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)], dim=1)
    high = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (torch.cat([low, high], dim=1) & 0xFF).to(torch.uint8)


def unpack_scales(packed: torch.Tensor) -> tuple:
    """get_scale_min_k4 for all eight sub-blocks: (scales, mins) int32 [m, 8] from the 12 bytes."""
    q = packed.to(torch.int32)
    scales = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], dim=1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scales, mins


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [m, 256] as Q4_K stores them: in each 64, byte l = code l | code l+32 << 4."""
    pairs = codes.reshape(-1, 4, 2, 32)
    return ((pairs[:, :, 0] | (pairs[:, :, 1] << 4)) & 0xFF).to(torch.uint8).reshape(codes.shape[0], 128)


def fifth_bits(codes: torch.Tensor) -> torch.Tensor:
    """Q5_K's qh [m, 32]: bit 2c of byte l is the fifth bit of code 64c + l, bit 2c+1 that of 64c + 32 + l."""
    high = (codes >> 4).reshape(-1, 8, 32)                              # half-chunks 0..7 = bit positions
    shifts = torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)
    return (high << shifts).sum(dim=1).to(torch.uint8)


def q6_k(x: torch.Tensor, importance: torch.Tensor | None, _kind: str = "Q6_K") -> torch.Tensor:
    """Q6_K blocks of x [m, 256]: 16 sub-blocks of 16 with signed 6-bit codes and int8 scales of one F16 d
    (quantize_row_q6_K_ref; with importance, quantize_row_q6_K_impl, whose search weighs by the imatrix
    alone)."""
    m = x.shape[0]
    groups = by_position(x, 16)                                         # [16, sub-blocks]
    weights = None if importance is None else by_position(importance, 16)
    scales, codes = symmetric_search(groups, 32, weights)
    scales = by_position(scales, 16)                                    # [16, m]
    magnitude = scales.abs()
    largest = torch.zeros_like(scales[0])
    signed = torch.zeros_like(scales[0])
    for ib in range(16):  # the first sub-block scale of the largest magnitude, signed
        take = magnitude[ib] > largest
        largest = torch.where(take, magnitude[ib], largest)
        signed = torch.where(take, scales[ib], signed)
    zero = largest < GROUP_MAX_EPS
    iscale = over(-128, signed)
    d16, d32 = as_f16(over(1, iscale))
    sc = nearest_int(iscale * scales).clamp_(max=127)                   # then stored in an int8_t
    sc = ((sc & 0xFF) ^ 0x80) - 0x80
    step = d32 * sc.to(F32)                                             # [16, m]
    final = nearest_int(x.reshape(m, 16, 16) / step.T[..., None]).clamp_(-32, 31) + 32
    searched = codes.T.reshape(m, 16, 16)
    codes = torch.where((step.T != 0)[..., None], final, searched).reshape(m, 2, 4, 32)
    a, b, c, e = (codes[:, :, k] for k in range(4))
    ql = torch.cat([(a & 0xF) | ((c & 0xF) << 4), (b & 0xF) | ((e & 0xF) << 4)], dim=2).reshape(m, 128)
    qh = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)).reshape(m, 64)
    blocks = torch.cat([(ql & 0xFF).to(torch.uint8), (qh & 0xFF).to(torch.uint8),
                        (sc.T & 0xFF).to(torch.uint8), d16.reshape(m, 1).view(torch.uint8)], dim=1)
    return torch.where(zero[:, None], torch.zeros_like(blocks), blocks)
