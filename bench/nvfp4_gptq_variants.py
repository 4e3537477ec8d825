"""Which NVFP4 GPTQ variant leaves the least output error on held-out text: SmolLM2 Linears of four layers,
Hessians from 8 windows of the licence texts, error measured on 8 other windows, relative to round to nearest.

    python bench/nvfp4_gptq_variants.py        (from the repository root; ~5 minutes on 2 cores)

Variants: group scales from the original weight (gptq.scales source, as llm-compressor) with and without static
activation order, dampening 0.01 and 0.1, minmax or imatrix_mse scales; and group scales searched on the
compensated weights when the column loop reaches each group (gptq.scales compensated), in storage order or group
by group (gptq.actorder groups). Every Linear reads the source model's inputs (not those of already rounded
layers).
"""

import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.quant import fp4, gptq, observe  # noqa: E402
from builder.release.recipe import Recipe  # noqa: E402

WEIGHTS = ROOT / "weights" / "smollm2-135m-instruct"
LAYERS = (0, 10, 20, 29)
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def recipe(actorder, observer="minmax", dampening=0.01, scales="source") -> Recipe:
    data = yaml.safe_load((ROOT / "specs" / "quant" / "nvfp4a16-gptq-imatrix.yaml").read_text())
    data["gptq"] = {"block_size": 128, "dampening_frac": dampening, "actorder": actorder, "scales": scales}
    if observer == "minmax":
        data["weights"].pop("observer_kwargs")
    data["weights"]["observer"] = observer
    return Recipe.of(data)


def inputs(model, names, ids) -> dict:
    found = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: found.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name in names]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(batches) for name, batches in found.items()}


def main() -> None:
    from transformers import AutoModelForCausalLM

    from builder.source import data

    torch.set_num_threads(1)
    spec = {**yaml.safe_load((ROOT / "specs" / "calibration" / "licenses.yaml").read_text()),
            "samples": 16, "sequence_length": 256}
    ids = data.samples(ROOT, spec, WEIGHTS, file="specs/calibration/licenses.yaml", group="calibration")
    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32)
    names = [f"model.layers.{layer}.{linear}" for layer in LAYERS for linear in LINEARS]
    fitted, held_out = inputs(model, names, ids[:8]), inputs(model, names, ids[8:])
    variants = {"gptq, original scales, static order, 0.01": recipe("static"),
                "gptq, original scales, storage order, 0.01": recipe(None),
                "gptq, compensated scales, storage order, 0.01": recipe(None, scales="compensated"),
                "gptq, original scales, static order, 0.1": recipe("static", dampening=0.1),
                "gptq + imatrix_mse, static order, 0.01": recipe("static", "imatrix_mse"),
                "gptq + imatrix_mse, static order, 0.1 (shipped)": recipe("static", "imatrix_mse", 0.1),
                "gptq + imatrix_mse, storage order, compensated scales, 0.1": recipe(None, "imatrix_mse", 0.1,
                                                                                     "compensated"),
                "gptq + imatrix_mse, group order, original scales, 0.1": recipe("groups", "imatrix_mse", 0.1),
                "gptq + imatrix_mse, group order, compensated scales, 0.1": recipe("groups", "imatrix_mse", 0.1,
                                                                                   "compensated"),
                "gptq + imatrix_mse, group order, compensated scales, 0.05": recipe("groups", "imatrix_mse", 0.05,
                                                                                    "compensated")}
    totals = dict.fromkeys(variants, 0.0)
    for name in names:
        weight, x = model.get_submodule(name).weight.data.float(), held_out[name]
        hessian, importance = fitted[name].T @ fitted[name], (fitted[name] ** 2).mean(0)
        global_scale = fp4.global_scale(weight.abs().amax())
        scale = fp4.group_scales(weight, global_scale, 16)
        rtn = fp4.dequantize(fp4.quantize_weight(weight, scale, global_scale, 16), scale, global_scale, 16)
        baseline = float(((x @ (rtn - weight).T) ** 2).sum())
        for label, settings in variants.items():
            values = fp4.dequantize(*gptq.quantize(weight, hessian, settings, name, importance, global_scale), 16)
            totals[label] += float(((x @ (values - weight).T) ** 2).sum()) / baseline / len(names)
        print(name, "done", flush=True)
    print("| variant | held-out output error / round to nearest's (mean over Linears) |\n|---|---|")
    for label, total in totals.items():
        print(f"| {label} | {total:.3f} |")


if __name__ == "__main__":
    main()
