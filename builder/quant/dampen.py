"""GPTQ's dampening of a Hessian, shared by its factorisation (gptq.factorise) and the asymmetric
calibration's targets (asymmetric.targets_), and the refusal of a Hessian that is still not positive
definite.

    dead, dampening = dampen_(hessian, recipe.gptq.dampening_frac)
"""

import torch

from builder.errors import BuilderError, Problem


def dampen_(hessian: torch.Tensor, fraction: float) -> tuple:
    """(dead, λ): the inputs never seen count 1 on the diagonal, then λ = fraction x the diagonal's mean is
    added to it, in place (the eye's off-diagonal zeros added nothing: the dampening goes on the diagonal alone)."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    dampening = fraction * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(dampening)
    return dead, dampening


def indefinite(fraction: float, module: str) -> BuilderError:
    """The refusal of a dampened Hessian that has no Cholesky factor."""
    return BuilderError(Problem("quant", "gptq.dampening_frac", f"{fraction}: the Hessian of {module} is not "
                                "positive definite; raise dampening_frac or calibrate on more samples"))
