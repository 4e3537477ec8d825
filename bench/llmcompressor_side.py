"""llm-compressor's side of bench/compare.py: one oneshot run on given token windows; runs in its own venv.

    /work/venvs/llmc/bin/python bench/llmcompressor_side.py RECIPE SOURCE_DIR IDS.safetensors OUT_DIR [GROUP_SIZE]

GROUP_SIZE (INT4 recipes): 64 by default, what SmolLM2's releases use; bench/memory_scale.py passes 128.
"""

import sys

# Recipes equivalent to specs/quant/ (same targets, ignore, arguments); llm-compressor 0.14 names.
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
W4_G64 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True, "dynamic": False}
# Its defaults, one per format, and its best opt-in for each: GPTQ (block 128, dampening 0.01, static
# activation order: its defaults) with a searched weight observer at its default settings. imatrix_mse
# only searches channel and group scales (per-tensor weights fall back to plain mse), so FP8-static
# gets mse. NVFP4 and NVFP4A16: GPTQ with the preset's own observer (its global scale from the fused
# Linears' max |w|, then group scales, then GPTQ rounds against them), and with imatrix_mse group scales.
SCHEMES = {"fp8-dynamic": {"scheme": "FP8_DYNAMIC"}, "fp8-static": {"scheme": "FP8", "kv_cache_scheme": KV_FP8},
           "w8a8-int8": {"scheme": "W8A8"}, "nvfp4a16": {"scheme": "NVFP4A16"}, "nvfp4": {"scheme": "NVFP4"}}
BEST = {"fp8-dynamic-gptq-imatrix": ("fp8-dynamic", "imatrix_mse"), "fp8-static-gptq-mse": ("fp8-static", "mse"),
        "w8a8-int8-gptq-imatrix": ("w8a8-int8", "imatrix_mse"), "w4a16-gptq-imatrix": ("w4a16", "imatrix_mse"),
        "w4a16-gptq-mse": ("w4a16", "mse"), "nvfp4a16-gptq": ("nvfp4a16", None),
        "nvfp4a16-gptq-imatrix": ("nvfp4a16", "imatrix_mse"), "nvfp4-gptq": ("nvfp4", None),
        "nvfp4-gptq-imatrix": ("nvfp4", "imatrix_mse")}
# SmoothQuant (its default strength, 0.5, and its default Llama mappings: input_layernorm -> q/k/v,
# post_attention_layernorm -> gate/up) before round to nearest: the same recipe as ours.
SMOOTHED = {"w8a8-int8-smoothquant": ("w8a8-int8", 0.5)}
RECIPES = (*SCHEMES, "w4a16", "w4a16-gptq", *BEST, *SMOOTHED)


def modifier(recipe: str, group_size: int = 64):
    """The modifier (or list of modifiers, applied in order) oneshot runs for a recipe name."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    common = {"targets": ["Linear"], "ignore": ["lm_head"]}
    gptq = {"block_size": 128, "dampening_frac": 0.01}
    if recipe in SCHEMES:
        return QuantizationModifier(**SCHEMES[recipe], **common)
    if recipe in SMOOTHED:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        base, strength = SMOOTHED[recipe]
        return [SmoothQuantModifier(smoothing_strength=strength), QuantizationModifier(**SCHEMES[base], **common)]
    w4 = {**W4_G64, "group_size": group_size}
    groups = {"group_0": {"targets": ["Linear"], "weights": w4}}
    if recipe == "w4a16":
        return QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if recipe == "w4a16-gptq":
        return GPTQModifier(config_groups=groups, ignore=["lm_head"], **gptq)
    if recipe in BEST:
        base, observer = BEST[recipe]
        if base == "w4a16":
            groups = {"group_0": {"targets": ["Linear"], "weights": {**w4, "observer": observer}}}
            return GPTQModifier(config_groups=groups, ignore=["lm_head"], **gptq)
        observed = {"weight_observer": observer} if observer else {}  # None: the preset's own observer
        return GPTQModifier(**SCHEMES[base], **common, **observed, **gptq)
    raise SystemExit(f"unknown recipe {recipe}; known: {', '.join(RECIPES)}")


def main(recipe: str, source: str, ids_file: str, out: str, group_size: str = "64") -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source)
    oneshot(model=model, dataset=dataset, recipe=modifier(recipe, int(group_size)), max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
