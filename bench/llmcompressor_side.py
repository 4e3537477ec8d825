"""llm-compressor's side of bench/compare.py: one oneshot run on given token windows; runs in its own venv.

    /work/venvs/llmc/bin/python bench/llmcompressor_side.py RECIPE SOURCE_DIR IDS.safetensors OUT_DIR [GROUP_SIZE]

GROUP_SIZE (INT4 recipes): 64 by default, what SmolLM2's releases use; bench/memory_scale.py passes 128.
"""

import sys

# Recipes equivalent to specs/quant/ (same targets, ignore, arguments); llm-compressor 0.14 names.
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
W4_G64 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True, "dynamic": False}


def modifier(recipe: str, group_size: int = 64):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    common = {"targets": ["Linear"], "ignore": ["lm_head"]}
    if recipe == "fp8-dynamic":
        return QuantizationModifier(scheme="FP8_DYNAMIC", **common)
    if recipe == "fp8-static":
        return QuantizationModifier(scheme="FP8", kv_cache_scheme=KV_FP8, **common)
    if recipe == "w8a8-int8":
        return QuantizationModifier(scheme="W8A8", **common)
    groups = {"group_0": {"targets": ["Linear"], "weights": {**W4_G64, "group_size": group_size}}}
    if recipe == "w4a16":
        return QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if recipe == "w4a16-gptq":
        return GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    raise SystemExit(f"unknown recipe {recipe}")


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
