"""GPTQ rounding of one weight matrix (Frantar et al., 2022): deterministic, FP32, CPU.

    values, scale = gptq.quantize(weight, hessian, spec["quant"])
"""

import torch

from builder.errors import BuilderError, Problem
from builder.quantize import quantize_weight, scale_format, value_range, weight_scale


def quantize(weight: torch.Tensor, hessian: torch.Tensor, quant: dict, module: str = "") -> tuple:
    """Integer weights (int8 tensor) and their scales (output scale dtype) for one Linear.

    Scales come from the original weights (as round-to-nearest would choose them, cast to the
    stored dtype); GPTQ then picks each column's integers so that the error on the calibration
    inputs' second moments (hessian = sum of x xᵀ) is compensated on the columns not yet rounded.
    """
    args, settings = quant["weights"], quant["gptq"]
    weight = weight.to(torch.float32).clone()
    scale_dtype, _ = scale_format(quant)
    scale = weight_scale(weight, args).to(scale_dtype)
    column_scale = expand(scale.to(torch.float32), args, weight.shape[1])
    inverse = inverse_hessian(weight, hessian.to(torch.float32).clone(), settings["dampening_frac"], module)
    q_min, q_max = value_range(args)
    columns, block = weight.shape[1], settings["block_size"]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk, errors = weight[:, start:end].clone(), torch.zeros_like(weight[:, start:end])
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column, step = chunk[:, i], column_scale[:, start + i]
            rounded = torch.round(column / step).clamp(q_min, q_max) * step
            error = (column - rounded) / local[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
            chunk[:, i] = rounded
            errors[:, i] = error
        weight[:, start:end] = chunk
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return quantize_weight(weight, scale.to(torch.float32), args), scale


def expand(scale: torch.Tensor, args: dict, columns: int) -> torch.Tensor:
    """Scales as one column per weight column: [rows, columns]."""
    if args["strategy"] == "group":
        return scale.repeat_interleave(args["group_size"], dim=1)
    return scale.expand(-1, columns) if scale.dim() == 2 else scale.reshape(1, 1).expand(1, columns)


def inverse_hessian(weight: torch.Tensor, hessian: torch.Tensor, dampening: float, module: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; inputs never seen zero their columns."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += torch.eye(hessian.shape[0]) * (dampening * torch.mean(torch.diag(hessian)))
    try:
        lower = torch.linalg.cholesky(hessian)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except RuntimeError:
        raise BuilderError(Problem("quant", "gptq.dampening_frac", f"{dampening}: the Hessian of {module} "
                                   "is not positive definite; raise dampening_frac or calibrate on more "
                                   "samples")) from None

