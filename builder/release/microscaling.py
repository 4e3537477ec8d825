"""compressed-tensors' presets for FP4, microscaled and mixed-type weights (NVFP4, MXFP4, MXFP8, W4AFP8) as
data, and the rules a recipe using them follows. Pure.

    preset(recipe)      # 'nvfp4', 'mxfp8a16', 'w4afp8', ... or None: the recipe's kernel family
    preset_problems(recipe)    # [(key path, message)] for a recipe whose arguments are none of them

A recipe's weights and activations must be one preset's exactly (the arithmetic behind each is
builder/quant/fp4.py and mx.py); what a preset leaves open (None) is free.
"""

FIELDS = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic", "scale_dtype")
NVFP4 = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
             scale_dtype="float8_e4m3fn")
MXFP4 = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, scale_dtype="uint8")
MXFP8 = {**MXFP4, "num_bits": 8}
# name -> (weights, input activations or None): compressed-tensors 0.17's presets (quant_scheme.py)
PRESETS = {
    "nvfp4a16": ({**NVFP4, "dynamic": False}, None),
    "nvfp4": ({**NVFP4, "dynamic": False}, {**NVFP4, "dynamic": "local"}),
    "mxfp4a16": ({**MXFP4, "dynamic": False}, None),
    "mxfp4": ({**MXFP4, "dynamic": False}, {**MXFP4, "dynamic": True}),
    "mxfp8a16": ({**MXFP8, "dynamic": False}, None),
    "mxfp8": ({**MXFP8, "dynamic": False}, {**MXFP8, "dynamic": True}),
    # group size left open: compressed-tensors' preset and vLLM's Hopper W4A8 kernel take 128
    "w4afp8": (dict(num_bits=4, type="int", strategy="group", group_size=None, symmetric=True, dynamic=False,
                    scale_dtype=None),
               dict(num_bits=8, type="float", strategy="token", group_size=None, symmetric=True, dynamic=True,
                    scale_dtype=None)),
}


def agrees(args, wanted: dict | None) -> bool:
    if args is None or wanted is None:
        return args is None and wanted is None
    return all(wanted[key] is None and key == "group_size" or getattr(args, key) == wanted[key] for key in FIELDS)


def preset(recipe) -> str | None:
    """The preset the recipe's weights and activations are, or None."""
    for name, (weights, acts) in PRESETS.items():
        if agrees(recipe.weights, weights) and agrees(recipe.input_activations, acts):
            return name
    return None


# NVFP4 groups without the global scale (mlx's nvfp4 on dense Linears): no compressed-tensors preset, the
# same kernel family as NVFP4A16's weights
GROUP_SCALES_ONLY = {"nvfp4a16": ({**NVFP4, "strategy": "group", "dynamic": False}, None)}


def family(recipe) -> str | None:
    """The kernel family (a preset's name) of the recipe's weights and activations: the preset it is, or the
    one it is but for NVFP4's global scale; None for the integer and FP8 recipes."""
    found = preset(recipe)
    if found is None:
        found = next((name for name, (weights, acts) in GROUP_SCALES_ONLY.items()
                      if agrees(recipe.weights, weights) and agrees(recipe.input_activations, acts)), None)
    return found


def claims(recipe) -> bool:
    """Whether the recipe asks for these formats: FP4 or scale-dtype weights, or 4-bit weights with FP8
    activations (anything else follows the rules of the integer and FP8 recipes)."""
    weights, acts = recipe.weights, recipe.input_activations
    return weights is not None and (weights.scale_dtype is not None or weights.strategy == "tensor_group"
                                    or (weights.type == "float" and weights.num_bits == 4)
                                    or (acts is not None and acts.scale_dtype is not None)
                                    or (weights.num_bits == 4 and acts is not None and acts.type == "float"))


def preset_problems(recipe) -> list:
    """A recipe these formats claim must be one preset, rounded to nearest with max |w| scales (NVFP4 also
    by GPTQ, with any observer's group scales)."""
    found = []
    if preset(recipe) is None:
        names = ", ".join(PRESETS)
        closest = max(PRESETS, key=lambda name: likeness(recipe, name))
        weights, acts = PRESETS[closest]
        found.append((("quant", "weights"), f"{words(recipe.weights)} is no weight format the builder writes: float "
                      "weights are FP8 E4M3 (num_bits 8) or one of compressed-tensors' FP4/MX presets with exactly "
                      f"their arguments, and INT4 weights with FP8 activations its W4AFP8 ({names}; docs/recipes.md "
                      f"lists them). Closest, {closest}: weights ({words(weights)}), activations ({words(acts)})"))
    weights = recipe.weights
    float_weights = weights.type == "float"
    nvfp4 = weights.strategy == "tensor_group"  # GPTQ and the scale searches round NVFP4 groups (quant/gptq.py)
    if float_weights and recipe.algorithm != "rtn" and not (nvfp4 and recipe.algorithm == "gptq"):
        found.append((("quant", "algorithm"), f"{recipe.algorithm}: MX weights are rounded to nearest (rtn), NVFP4 "
                      "weights to nearest or by GPTQ; GPTQ also runs on integer and FP8 weights"))
    if float_weights and weights.observer != "minmax" and not (nvfp4 and recipe.algorithm == "gptq"):
        found.append((("quant", "weights", "observer"), f"{weights.observer}: MX group scales, and NVFP4's rounded "
                      "to nearest, are max |w| (minmax); NVFP4 with algorithm gptq searches them"))
    if float_weights and (recipe.smoothing is not None or recipe.awq is not None):
        found.append((("quant", "awq" if recipe.awq is not None else "smoothing"), "scaling factors are not "
                      "folded into FP4 or MX weights"))
    if recipe.format != "compressed-tensors" and (recipe.format, preset(recipe)) != ("mxfp4", "mxfp4a16"):
        found.append((("quant", "format"), f"{recipe.format}: these presets are compressed-tensors formats "
                      "(MXFP4A16 also gpt-oss's own, format mxfp4)"))
    return found


def likeness(recipe, name: str) -> int:
    """How many of a preset's weight and activation arguments the recipe shares (the closest one is shown)."""
    weights, acts = PRESETS[name]
    shared = sum(getattr(recipe.weights, key) == weights[key] for key in FIELDS)
    if acts is None or recipe.input_activations is None:
        return shared + (acts is None and recipe.input_activations is None)
    return shared + sum(getattr(recipe.input_activations, key) == acts[key] for key in FIELDS)


def words(args) -> str:
    """A quantization argument set (Args or a preset's dict) in a few words, for messages."""
    if args is None:
        return "16-bit"
    value = args.get if isinstance(args, dict) else lambda key: getattr(args, key)
    return ", ".join(f"{key} {value(key)}" for key in FIELDS if value(key) is not None)


# compressed-tensors' format name (config.json's quantization_config.format) of each preset
FORMATS = {"nvfp4a16": "nvfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4a16": "mxfp4-pack-quantized",
           "mxfp4": "mxfp4-pack-quantized", "mxfp8a16": "mxfp8-quantized", "mxfp8": "mxfp8-quantized",
           "w4afp8": "pack-quantized"}
