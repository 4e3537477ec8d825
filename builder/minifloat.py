"""The numbers behind NVFP4's and the OCP microscaling formats' codes, for every stage that reads them
(quant/ writes them, source/ dequantizes published checkpoints, mlx's modes read them back):

    minifloat.e2m1(codes)                 # FP32 values of uint8 FP4 E2M1 codes (bit 3: the sign)
    minifloat.e8m0(exponents, dtype)      # 2 ** (e - 127) of E8M0 exponents (uint8, bias 127), exact
    minifloat.pairs(codes)                # uint8 E2M1 codes [rows, columns] two a byte, the first in the low nibble

No rounding here: each writer rounds as the runtime it serves does (quant/fp4.py as compressed-tensors,
quant/mlxfp.py as mlx), but every one of them reads a code back to the same number.
"""

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of codes 0..7
E8M0_BIAS = 127


def e2m1(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of uint8 (or integer) E2M1 codes: magnitude index in bits 0-2, sign in bit 3."""
    magnitude = torch.tensor(E2M1, dtype=torch.float32, device=codes.device)[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -magnitude, magnitude)


def e8m0(exponents: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2 ** (e - 127) of E8M0 exponents in dtype: computed in FP32 by ldexp (exact for every code; 255,
    E8M0's NaN, gives inf) and cast (exact in FP32 and BF16, which hold all of these powers)."""
    ones = torch.ones(exponents.shape, dtype=torch.float32, device=exponents.device)
    return torch.ldexp(ones, exponents.to(torch.int32) - E8M0_BIAS).to(dtype)


def pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes [rows, columns] packed two a byte along columns, the first in the low nibble: how
    compressed-tensors' nvfp4/mxfp4-pack-quantized and gpt-oss's `_blocks` store them."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
