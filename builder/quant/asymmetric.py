"""GPTQ's asymmetric calibration (after GPTAQ: Li et al., 2025, "GPTAQ: Efficient Finetuning-Free Quantization
for Asymmetric Calibration"), a calibration step and the targets it gives GPTQ.

GPTQ fits each Linear's rounded weights Q to its source weights W on the inputs X the layers before it
give once rounded: least ||X Qᵀ - X Wᵀ||. The error those layers made is then left as it is. Here the
layer's leading Linears (those reading its input through its first norm: q/k/v) aim at what the source
model computes on its own inputs X̃ (the same tokens through the unrounded layers): least
||X Qᵀ - X̃ Wᵀ||² + λ ||Q - W||², λ GPTQ's dampening. With H = XᵀX and C = XᵀX̃ that is ||Q - W'||² under
H + λI (plus a constant), W' = W (C + λI)ᵀ (H + λI)⁻¹: GPTQ's own problem, rounding towards W' instead of
W, so its column loop, scales and dampening stay as they are. Where X̃ = X (the first layer), W' = W.

    seen["cross"] = CROSS.observe(layer, recipe)   # C, the source's stream run beside (Step.beside)
    targets_(layer, recipe, hessians, seen["cross"])  # in gptq.finish: each leading Linear's weight becomes W'

Cost: one more forward pass of the layer per calibration batch (the source's stream), a second set of
hidden states, and C beside the leading Linears' Hessian while the layer calibrates. Tokens are paired
one to one; a mixture of experts routes the two streams' tokens apart, but its experts never lead a
layer (attention does), and a leading Linear whose two streams differ in tokens is refused.
"""

import torch

from builder.errors import BuilderError, Problem
from builder.quant.dampen import dampen_, indefinite
from builder.quant.step import CALIBRATION, SOURCE, Layer, Step, rows


def observe(layer: Layer, recipe) -> dict:
    """The leading Linears' cross sums: {"names": the Linears that read the input the layer's first Linear
    reads (q/k/v; in a parallel block the MLP's too), "sum": C = Σ_tokens x x̃ᵀ [features, features] FP32},
    x the calibration's input, x̃ the source's for the same token, batches in order."""
    found, state = {"names": set(), "sum": None}, {"stream": None, "input": None, "paired": None}

    def on(stream, name):
        def hook(module, args):
            if state["stream"] != stream:  # the batch's first Linear in this stream
                state.update(stream=stream, input=args[0])
                if stream == SOURCE:
                    state["paired"] = rows(args)
                else:
                    add(name, rows(args))
            if args[0] is state["input"]:
                found["names"].add(name)
        return hook

    def add(name, x):
        paired, state["paired"] = state["paired"], None
        if paired is None or x.shape != paired.shape:
            tokens = 0 if paired is None else paired.shape[0]
            raise BuilderError(Problem("quant", "gptq.asymmetric", f"true: {name} read {x.shape[0]} tokens of "
                                       f"calibration and {tokens} of the source model's; set false"))
        found["sum"] = x.T @ paired if found["sum"] is None else found["sum"].addmm_(x.T, paired)

    for name, module in layer.linears.items():
        layer.on_input(module, on(SOURCE, name), stream=SOURCE)
        layer.on_input(module, on(CALIBRATION, name))
    layer.removers.append(lambda: state.update(input=None, paired=None))
    return found


def targets_(layer: Layer, recipe, hessians: dict, cross: dict) -> None:
    """The leading Linears get their target W' (FP32) as their weight, before GPTQ reads it (and NVFP4's
    global scales are taken): W' = W (C + λI)ᵀ (H + λI)⁻¹ (above), H dampened as
    gptq.factorise dampens it (dampen_), C the CROSS step's sum; Linears sharing a Hessian share one Cholesky.
    The entries hold the Hessians summed (gptq.summed).

    Only the leading Linears: the others' calibration inputs are made by the layer's own unrounded
    Linears, and the difference from the source's that they would make up for is mostly made up for
    already by the leading Linears' targets (on a tiny Llama, targets for every Linear left more logit
    error than GPTQ; for q/k/v alone, a third less: tests/test_asymmetric.py)."""
    groups = {}
    for name in sorted(cross["names"] & hessians.keys()):
        groups.setdefault(id(hessians[name]), []).append(name)
    for names in groups.values():
        dampened = hessians[names[0]][0].to(torch.float32).clone()
        _, dampening = dampen_(dampened, recipe.gptq.dampening_frac)
        try:
            root = torch.linalg.cholesky(dampened)  # lower triangular
        except RuntimeError:
            raise indefinite(recipe.gptq.dampening_frac, names[0]) from None
        del dampened
        moved = cross["sum"] + dampening * torch.eye(len(root), device=root.device)  # C + λI
        for name in names:
            module = layer.linears[name]
            weight = module.weight.data.to(torch.float32)
            module.weight.data = torch.cholesky_solve(moved @ weight.T, root).T.contiguous()
            del weight
        del root, moved
    cross["sum"] = None


CROSS = Step("cross", (), {"gptq.asymmetric": True}, observe=observe, beside=True)
