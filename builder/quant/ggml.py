"""llama.cpp's Q8_0 and Q4_0 weight blocks, bit for bit as ggml-quants.c writes them, and its
importance-weighted Q4_0 scale search (quantize_row_q4_0_impl, what llama-quantize --imatrix runs).
FP32 on CPU, one weight at a time.

    blocks = ggml.quantize(weight, "Q4_0", importance)   # uint8 [rows, columns / 32 * 18]

Each row is cut into blocks of 32 values along the input features; a block is an F16 scale d and
32 codes: Q8_0 stores int8 q (x = d q), Q4_0 nibbles q in 0..15 (x = d (q - 8)), value j in the low
nibble of byte j and value j + 16 in its high nibble. Every sum runs in C's order in FP32, and every
product is rounded on its own (no fused multiply-add), so the bytes equal the C code's on x86-64,
where ggml-base is built without FMA (tests/test_ggml.py holds them to vectors from it).
"""

import torch

BLOCK = 32                                 # values per block (QK8_0, QK4_0)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}     # F16 scale + 32 int8 / 16 bytes of nibbles
GROUP_MAX_EPS = 1e-15                      # ggml-quants.c: a block whose max |x| is below this is all zero
SEARCH_STEPS = tuple(step for step in range(-9, 10) if step)  # make_qx_quants' 18 alternative grids
CHUNK_BLOCKS = 8192  # blocks searched together: 19 grids x 32 x 8192 x 4 B = 20 MB of temporaries


def row_bytes(kind: str, columns: int) -> int:
    """Bytes of one row of columns values (columns a multiple of BLOCK)."""
    return columns // BLOCK * BLOCK_BYTES[kind]


def quantize(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """A [rows, columns] weight as llama.cpp blocks of kind (Q8_0 or Q4_0): uint8 [rows, row_bytes].

    importance: E[x_j^2] per input feature (an imatrix) for Q4_0's weighted scale search; None
    rounds as llama.cpp's reference quantizer does (and Q8_0 takes none, as in llama.cpp).
    """
    x = weight.to(torch.float32).contiguous()
    if kind == "Q8_0":
        return q8_0(x)
    if importance is None:
        return q4_0(x)
    return q4_0_weighted(x, importance.to(torch.float32))


def with_scales(scale: torch.Tensor, payload: torch.Tensor, rows: int) -> torch.Tensor:
    """Blocks as bytes: each block's F16 scale (little-endian) followed by its payload bytes."""
    d = scale.to(torch.float16).reshape(-1, 1).view(torch.uint8)
    return torch.cat([d, payload], dim=1).reshape(rows, -1)


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of [blocks, 32] packed as Q4_0 stores them: byte j = code j | code j+16 << 4."""
    codes = codes.to(torch.uint8)
    return codes[:, :16] | (codes[:, 16:] << 4)


def roundf(values: torch.Tensor) -> torch.Tensor:
    """C's roundf: to nearest, halves away from zero (torch.round rounds halves to even)."""
    magnitude = values.abs()
    whole = magnitude.floor()
    return torch.sign(values) * (whole + (2 * (magnitude - whole)).floor())


def signed_max(blocks: torch.Tensor) -> tuple:
    """(max |x|, the signed value of the first element reaching it) per block, as the C loops find
    them: a block of zeros (or negative zeros) gives +0."""
    magnitude = blocks.abs()
    amax = magnitude.amax(dim=1)
    first = blocks.gather(1, magnitude.argmax(dim=1, keepdim=True)).squeeze(1)
    return amax, torch.where(amax == 0, torch.zeros_like(first), first)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: d = max |x| / 127, q = roundf(x / d) with the FP32 d."""
    rows = x.shape[0]
    blocks = x.reshape(-1, BLOCK)
    d = blocks.abs().amax(dim=1) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = roundf(blocks * inverse[:, None]).to(torch.int8).view(torch.uint8)
    return with_scales(d, codes, rows)


def q4_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_ref: d = max / -8 (the block's largest-magnitude value, signed), so that
    value lands on code 0; q = min(15, trunc(x / d + 8.5))."""
    rows = x.shape[0]
    blocks = x.reshape(-1, BLOCK)
    _, peak = signed_max(blocks)
    d = peak / -8
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = (blocks * inverse[:, None] + 8.5).trunc().clamp_(max=15)
    return with_scales(d, nibbles(codes), rows)


def q4_0_weighted(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_impl with quant_weights: per block, the weights w_j = imatrix_j *
    sqrt(sigma2 + x_j^2) (sigma2 = the row's mean square) choose among 19 grids the codes and the
    least-squares scale that minimise sum_j w_j (x_j - d l_j)^2 (make_qx_quants, rmse_type 1)."""
    rows, columns = x.shape
    squares = torch.zeros(rows, dtype=torch.float32)
    for j in range(columns):  # C sums the row's squares in order, in FP32
        squares += x[:, j] * x[:, j]
    sigma2 = (squares / columns).repeat_interleave(columns // BLOCK)
    blocks = x.reshape(-1, BLOCK)
    block_importance = importance.reshape(-1, BLOCK)
    scales, codes = [], []
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        part = slice(start, start + CHUNK_BLOCKS)
        index = torch.arange(start, min(start + CHUNK_BLOCKS, blocks.shape[0])) % block_importance.shape[0]
        scale, chosen = search(blocks[part], block_importance[index], sigma2[part])
        scales.append(scale)
        codes.append(chosen)
    return with_scales(torch.cat(scales), nibbles(torch.cat(codes)), rows)


def search(blocks: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor) -> tuple:
    """make_qx_quants(32, 8, x, L, 1, w) for [n, 32] blocks: (scales [n], codes 0..15 [n, 32])."""
    # sqrtf is correctly rounded; torch's FP32 sqrt on CPU is not always (AVX-512), FP64's then rounded is
    root = torch.sqrt((sigma2[:, None] + blocks * blocks).to(torch.float64)).to(torch.float32)
    weights_t = (importance * root).T.contiguous()  # [32, n]: position j of every block in one row
    blocks_t = blocks.T.contiguous()
    weighted_t = weights_t * blocks_t               # w*x, the first product of C's w*x[i]*l
    amax, peak = signed_max(blocks)
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)  # zero blocks: any grid; their codes are reset below
    eight, tenth = torch.tensor(8.0), torch.tensor(0.1)
    nmax = torch.stack([eight, *(eight + tenth * step for step in SEARCH_STEPS)])  # 19 grids, C's order
    grids = torch.round((-nmax[:, None, None] / peak) * blocks_t).clamp_(-8, 7)  # [19, 32, n]; nearest_int
    sumlx = torch.zeros(len(nmax), blocks.shape[0])
    suml2 = torch.zeros_like(sumlx)
    for j in range(BLOCK):  # in C's order: sumlx += w*x[i]*l; suml2 += w*l*l
        sumlx += weighted_t[j] * grids[:, j]
        suml2 += weights_t[j] * grids[:, j] * grids[:, j]
    chosen = grids[0]
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(sumlx[0]))
    best = scale * sumlx[0]
    for grid in range(1, len(nmax)):
        take = (suml2[grid] > 0) & (sumlx[grid] * sumlx[grid] > best * suml2[grid])
        chosen = torch.where(take, grids[grid], chosen)
        scale = torch.where(take, sumlx[grid] / suml2[grid], scale)
        best = torch.where(take, scale * sumlx[grid], best)
    chosen = torch.where(zero, torch.tensor(-8.0), chosen) + 8  # a zero block stores codes 0 and d = 0
    return torch.where(zero, torch.zeros_like(scale), scale), chosen.T


def dequantize(blocks: torch.Tensor, kind: str, columns: int) -> torch.Tensor:
    """FP32 [rows, columns] from the blocks quantize() wrote (for tests and checks)."""
    rows = blocks.shape[0]
    data = blocks.reshape(-1, BLOCK_BYTES[kind])
    d = data[:, :2].contiguous().view(torch.float16).to(torch.float32)
    if kind == "Q8_0":
        values = data[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    else:
        packed = data[:, 2:]
        values = torch.cat([packed & 0x0F, packed >> 4], dim=1).to(torch.float32) - 8
    return (d * values).reshape(rows, columns)
