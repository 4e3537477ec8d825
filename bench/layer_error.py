"""Layer output error on held-out text, per weight observer and GPTQ setting: how the shipped
*-gptq-imatrix settings were chosen, in minutes instead of whole builds and evaluations.

    python bench/layer_error.py [--format w4a16] [--layers 3,15,27] [--samples 64] [--eval-samples 4]

The source SmolLM2 runs in FP32 over calibration windows (data/calibration.txt, as the releases draw them)
and evaluation windows (data/eval.txt); each listed layer's q_proj, o_proj, up_proj and down_proj is
quantized from its calibration inputs (H = sum x xᵀ, E[x²]) exactly as a build does (builder.quant.gptq,
builder.quant.observe), and scored by ||(W - Q) X_eval||² / ||W X_eval||² on the evaluation inputs.
Prints one line per Linear and the geometric mean per variant (x 1e4). Run from the repository root.
"""

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = {"w4a16": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64},
           "fp8-dynamic": {"num_bits": 8, "type": "float", "strategy": "channel", "group_size": None},
           "w8a8-int8": {"num_bits": 8, "type": "int", "strategy": "channel", "group_size": None}}
FINE = {"grid": 100, "maxshrink": 0.5, "norm": 3.0, "patience": 0}
# name -> (observer, observer_kwargs, algorithm, GPTQ dampening_frac)
VARIANTS = {"minmax rtn": ("minmax", {}, "rtn", None), "mse rtn": ("mse", {}, "rtn", None),
            "imatrix_mse rtn": ("imatrix_mse", {}, "rtn", None), "minmax gptq": ("minmax", {}, "gptq", 0.01),
            "minmax gptq damp 0.1": ("minmax", {}, "gptq", 0.1), "imatrix_mse gptq": ("imatrix_mse", {}, "gptq", 0.01),
            "imatrix_mse fine gptq": ("imatrix_mse", FINE, "gptq", 0.01),
            "imatrix_mse gptq damp 0.05": ("imatrix_mse", {}, "gptq", 0.05),
            "imatrix_mse gptq damp 0.1": ("imatrix_mse", {}, "gptq", 0.1),
            "imatrix_mse gptq damp 0.3": ("imatrix_mse", {}, "gptq", 0.3)}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def recipe(weights: dict, observer: str, settings: dict, algorithm: str, dampening: float | None):
    from builder.release.recipe import Recipe

    return Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": algorithm, "targets": ["Linear"],
                      "ignore": [], "input_activations": None, "kv_cache_scheme": None,
                      "gptq": None if algorithm == "rtn" else {"block_size": 128, "dampening_frac": dampening,
                                                               "actorder": "static"},
                      "weights": {**weights, "symmetric": True, "dynamic": False, "observer": observer,
                                  "observer_kwargs": settings}})


def inputs(model, names: list, ids) -> dict:
    """Each named Linear's inputs over the windows ids, as [tokens, features] FP32."""
    import torch

    found, modules = {}, dict(model.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: found.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name in names]
    with torch.no_grad():
        for batch in ids.split(4):
            model(batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="w4a16", choices=sorted(WEIGHTS))
    parser.add_argument("--layers", default="3,15,27")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-samples", type=int, default=4, help="evaluation windows of 512 tokens")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from transformers import AutoModelForCausalLM

    from builder.quant import gptq, observe, quantize
    from compare import MODEL, windows

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(ROOT / "weights" / MODEL, dtype=torch.float32).eval()
    names = [f"model.layers.{index}.{linear}" for index in args.layers.split(",") for linear in LINEARS]
    calibration = inputs(model, names, windows("calibration", "licenses", args.samples, 512))
    held_out = inputs(model, names, windows("eval", "docstrings", args.eval_samples, 512))
    errors = {name: [] for name in VARIANTS}
    for name in names:
        weight, x, x_eval = model.get_submodule(name).weight.data, calibration[name], held_out[name]
        hessian, importance, reference = x.T @ x, x.square().mean(dim=0), x_eval @ weight.T
        for variant, (observer, settings, algorithm, dampening) in VARIANTS.items():
            chosen = recipe(WEIGHTS[args.format], observer, settings, algorithm, dampening)
            if algorithm == "gptq":
                values, scale = gptq.quantize(weight, hessian, chosen, name, importance)
            else:
                scale = observe.weight_scale(weight, chosen.weights, torch.bfloat16, importance)
                values = quantize.quantize_weight(weight, scale.float(), chosen.weights)
            restored = gptq.dequantize(values, scale, chosen.weights)
            errors[variant].append(float((x_eval @ restored.T - reference).square().sum() / reference.square().sum()))
        print(name, {variant: round(1e4 * found[-1], 2) for variant, found in errors.items()}, flush=True)
    print("| variant | geometric mean of relative output error (x 1e4) |\n|---|---:|")
    for variant, found in errors.items():
        print(f"| {variant} | {1e4 * math.exp(sum(map(math.log, found)) / len(found)):.2f} |")


if __name__ == "__main__":
    main()
