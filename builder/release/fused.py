"""Experts stored fused on disk (transformers' own layout for Llama 4, gpt-oss and Granite 4): which
families hold them, which a quantized build writes one Linear per expert (builder/formats/experts.py,
vLLM's names) or fused in a format of the family's own (gpt-oss's MXFP4, builder/formats/mxfp4.py), and
why the others refuse quantizing recipes (the fact 'expert layout'; docs/models.md, "Fused experts"). Pure.
"""

from builder import formats
from builder.formats import experts as on_disk

FUSED_ON_DISK = {"Llama4ForCausalLM": "llama4_text", "GptOssForCausalLM": "gpt_oss",
                 "GraniteMoeHybridForCausalLM": "granitemoehybrid"}
EXPERTS_SPLIT = ("Llama4ForCausalLM", "GraniteMoeHybridForCausalLM", "GptOssForCausalLM")
SPLIT_WHY = ("the builder writes them one Linear per expert (vLLM's layout) for compressed-tensors FP8 or "
             "weight-only integer weights per tensor, channel or group (round to nearest or GPTQ, minmax or "
             "searched scales), and NVFP4 and MX presets rounded to nearest; not for this recipe")
# compressed-tensors' FP4 and MX presets whose experts are written split, rounded to nearest (an expert's gate
# and up share NVFP4's global scale, quant/quantize.py fused_maxima); W4AFP8 is not: vLLM's Llama 4 W4A8 MoE
# path was not checked
SPLIT_PRESETS = ("nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4", "mxfp8a16", "mxfp8")
# ... but not for these families: transformers 5.17 reads Granite 4's split experts back through Mixtral's
# converters (formats/experts.py reading), whose dequantization leaves NVFP4's global scales unread
PRESETS_NOT_SPLIT = {"GraniteMoeHybridForCausalLM": ("nvfp4a16", "nvfp4")}
# ... and gpt-oss's only as symmetric weight-only integers, packed, per group or channel (compressed-tensors
# WNA16: w4a16, w4a16-gptq, w4a16-gptq-imatrix): vLLM 0.32's gpt-oss loader reads experts per expert only as
# CompressedTensorsWNA16MoEMethod's packed weights and scales (models/gpt_oss.py l. 72-81, l. 340-352;
# formats/experts.py), no zero points
INTEGER_ONLY = ("GptOssForCausalLM",)
# ... whose split experts transformers does not read (vLLM's own names): the builder's loader decompresses them
# into transformers' fused parameters (formats/experts.py filled) for its evaluation
VLLM_NAMES = ("GptOssForCausalLM",)
WHY = {"Llama4ForCausalLM": SPLIT_WHY,
       "GraniteMoeHybridForCausalLM": SPLIT_WHY + " (nor NVFP4: transformers 5.17 leaves the global scales of "
       "Granite 4's split experts unread when it loads them)",
       "GptOssForCausalLM": "vLLM 0.32 reads gpt-oss's experts quantized one per expert only as symmetric "
       "weight-only integers, packed (compressed-tensors WNA16: quant=w4a16, w4a16-gptq, w4a16-gptq-imatrix), "
       "or in gpt-oss's own MXFP4 (quant=gpt-oss-mxfp4); not this recipe",
       None: "the builder quantizes one Linear per expert and knows no converter for this layout"}


def splits(recipe) -> bool:
    """Whether a recipe's weights are written for experts split one Linear per expert (EXPERTS_SPLIT, tested)."""
    args = recipe.weights
    if recipe.format != "compressed-tensors" or (recipe.preset is not None and args.observer != "minmax"):
        return False
    if recipe.preset is not None:
        return recipe.preset in SPLIT_PRESETS and recipe.algorithm == "rtn"
    return args.strategy in ("tensor", "channel", "group") and ((args.type == "float" and args.num_bits == 8)
                                                                 or recipe.packed)


def split_on_write(cls: str, recipe) -> bool:
    """Whether a quantized build of this family writes its fused experts one Linear per expert."""
    if cls not in EXPERTS_SPLIT or recipe.weights is None or not splits(recipe):
        return False
    if cls in INTEGER_ONLY:
        args = recipe.weights
        return recipe.preset is None and recipe.packed and args.symmetric and args.strategy in ("channel", "group")
    return recipe.preset not in PRESETS_NOT_SPLIT.get(cls, ())


def kept_fused(cls: str, layout: str) -> bool:
    """Whether a format quantizes this family's experts fused, as they are (its FUSED, for its FAMILIES)."""
    fmt = formats.of(layout)
    return bool(getattr(fmt, "FUSED", None)) and cls in (fmt.FAMILIES or {}).values()


def quantizes_experts(arch: dict, recipe) -> bool:
    """Whether a recipe quantizes any of the fused experts' Linears (not when its ignore names every one of a
    known layout, formats/experts.py: they are then written fused, as the source holds them, which every
    runtime reads); any fused tensor of a layout the builder does not know counts as quantized."""
    for entry in (entry for entry in arch.get("checkpoint") or () if entry["role"] == "fused"):
        name = entry["name"].replace("{layer}", str((entry.get("layers") or [0])[0]))
        shape = tuple(entry.get("shape", ()))
        if not on_disk.fused(name, shape) or any(recipe.quantizes(module) for module, _ in
                                                 on_disk.linears(name, shape)):
            return True
    return False


def refusal(arch: dict, recipe) -> str | None:
    """Why a recipe cannot quantize a model whose architecture block lists fused experts; None when it can
    (no weights quantized, no fused experts, a family and recipe whose experts are split on write, or a
    recipe that leaves every expert out)."""
    names = [entry["name"] for entry in arch.get("checkpoint") or () if entry["role"] == "fused"]
    if recipe.weights is None or not names or split_on_write(arch["class"], recipe) \
            or kept_fused(arch["class"], recipe.format) or not quantizes_experts(arch, recipe):
        return None
    return (f"{arch['class']} stores its experts fused ({names[0]}); {WHY.get(arch['class'], WHY[None])} "
            "(the fact 'expert layout' in builder/release/fused.py)")
