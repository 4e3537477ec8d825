"""Which NVFP4 GPTQ variant leaves the least output error on held-out text: SmolLM2 Linears of four layers,
Hessians from 8 windows of the licence texts, error measured on 8 other windows, relative to round to nearest.

    python bench/nvfp4_gptq_variants.py        (from the repository root; ~5 minutes on 2 cores)

Variants: group scales from the original weight (what builder/quant/gptq.py does, as llm-compressor) with and
without static activation order, dampening 0.01 and 0.1, minmax or imatrix_mse scales; and group scales chosen
from the partly updated weights when the column loop reaches each group (storage order only; written here, not
in the builder). Every Linear reads the source model's inputs (not those of already rounded layers).
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


def recipe(actorder, observer="minmax", dampening=0.01) -> Recipe:
    data = yaml.safe_load((ROOT / "specs" / "quant" / "nvfp4a16-gptq-imatrix.yaml").read_text())
    data["gptq"] = {"block_size": 128, "dampening_frac": dampening, "actorder": actorder}
    if observer == "minmax":
        data["weights"].pop("observer_kwargs")
    data["weights"]["observer"] = observer
    return Recipe.of(data)


def per_group_scales(weight, hessian, settings, global_scale):
    """GPTQ in storage order with each group's FP8 scale taken from the updated weights when the loop reaches it."""
    factor = gptq.factorise(hessian.clone(), settings.gptq, "variant")
    work = weight.clone()
    inverse = torch.linalg.solve_triangular(factor.root, torch.eye(len(factor.root)), upper=True)  # U = R⁻¹
    work[:, factor.dead] = 0
    columns = work.shape[1]
    scales = torch.empty(work.shape[0], columns // 16, dtype=fp4.FP8)
    for start in range(0, columns, 128):
        end = min(start + 128, columns)
        chunk, local = work[:, start:end].T.contiguous(), inverse[start:end, start:end]
        errors = torch.zeros_like(chunk)
        for i in range(end - start):
            if (start + i) % 16 == 0:
                scales[:, (start + i) // 16] = fp4.scales_from_amax(chunk[i:i + 16].abs().amax(0), global_scale)
            step = fp4.steps(scales[:, (start + i) // 16], global_scale)
            rounded = fp4.rounded(chunk[i] / step) * step
            error = (chunk[i] - rounded) / local[i, i]
            chunk[i:] -= local[i, i:].unsqueeze(1) * error.unsqueeze(0)
            chunk[i], errors[i] = rounded, error
        work[:, start:end] = chunk.T
        work[:, end:] -= errors.T @ inverse[start:end, end:]
    return fp4.dequantize(fp4.quantize_weight(work, scales, global_scale, 16), scales, global_scale, 16)


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
    variants = {"gptq, original scales, static order, 0.01": (recipe("static"), False),
                "gptq, original scales, storage order, 0.01": (recipe(None), False),
                "gptq, per-group scales, storage order, 0.01": (recipe(None), True),
                "gptq, original scales, static order, 0.1": (recipe("static", dampening=0.1), False),
                "gptq + imatrix_mse, static order, 0.01": (recipe("static", "imatrix_mse"), False),
                "gptq + imatrix_mse, static order, 0.1 (shipped)": (recipe("static", "imatrix_mse", 0.1), False)}
    totals = dict.fromkeys(variants, 0.0)
    for name in names:
        weight, x = model.get_submodule(name).weight.data.float(), held_out[name]
        hessian, importance = fitted[name].T @ fitted[name], (fitted[name] ** 2).mean(0)
        global_scale = fp4.global_scale(weight.abs().amax())
        scale = fp4.group_scales(weight, global_scale, 16)
        rtn = fp4.dequantize(fp4.quantize_weight(weight, scale, global_scale, 16), scale, global_scale, 16)
        baseline = float(((x @ (rtn - weight).T) ** 2).sum())
        for label, (settings, per_group) in variants.items():
            if per_group:
                values = per_group_scales(weight, hessian, settings, global_scale)
            else:
                values = fp4.dequantize(*gptq.quantize(weight, hessian, settings, name, importance, global_scale), 16)
            totals[label] += float(((x @ (values - weight).T) ** 2).sum()) / baseline / len(names)
        print(name, "done", flush=True)
    print("| variant | held-out output error / round to nearest's (mean over Linears) |\n|---|---|")
    for label, total in totals.items():
        print(f"| {label} | {total:.3f} |")


if __name__ == "__main__":
    main()
