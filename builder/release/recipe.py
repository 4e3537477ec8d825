"""The quantization recipe as one typed, frozen value: what spec["quant"] means, asked in one place. Pure.

    recipe = Recipe.of(spec["quant"])
    recipe.needs_calibration, recipe.scheme_class, recipe.quantizes("model.layers.0.mlp.up_proj")
"""

import re
from dataclasses import dataclass

from builder import formats
from builder.release import microscaling
from builder.release.quantization import FP8_MAX, GPTQ, OBSERVERS, Args, Quant  # noqa: F401 (stages import them here)


def matches(module: str, cls: str, patterns) -> bool:
    """compressed-tensors' module target syntax: a class name, a module name, or 're:<regex>' on names."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module):
                return True
        elif pattern in (cls, module):
            return True
    return False


@dataclass(frozen=True)
class Recipe:
    """What spec["quant"] (the Quant model, validated) means to the stages. Build it once per resolved spec;
    every stage asks it, not the dict."""

    format: str            # dense, compressed-tensors, fp8 (the AutoFP8 / vLLM legacy layout), gguf, mlx
    dtype: str             # dtype of unquantized tensors and of scales (GGUF block scales are always F16)
    algorithm: str | None  # rtn, gptq, imatrix (gguf Q4_0); None when unquantized
    gptq: GPTQ | None
    targets: tuple
    ignore: tuple
    weights: Args | None
    input_activations: Args | None
    kv_cache_scheme: Args | None
    smoothing: float | None = None  # SmoothQuant's migration strength alpha; optional in specs (absent: none)
    awq: int | None = None          # AWQ-style activation-aware scaling: its grid of alphas; optional (absent: none)
    ggml_mix: str | None = None     # llama-quantize's per-tensor type preset (Q4_K_M, Q5_K_M); gguf only (absent: none)

    @classmethod
    def of(cls, quant: "dict | Quant") -> "Recipe":
        """From spec["quant"] (validated here: pydantic.ValidationError when it is not a Quant) or a Quant."""
        quant = quant if isinstance(quant, Quant) else Quant.of(quant)
        return cls(format=quant.format, dtype=quant.dtype, algorithm=quant.algorithm, gptq=quant.gptq,
                   targets=tuple(quant.targets), ignore=tuple(quant.ignore), weights=quant.weights,
                   input_activations=quant.input_activations, kv_cache_scheme=quant.kv_cache_scheme,
                   smoothing=None if quant.smoothing is None else float(quant.smoothing.alpha),
                   awq=None if quant.awq is None else quant.awq.grid, ggml_mix=quant.ggml_mix)

    @property
    def dense(self) -> bool:
        return self.weights is None

    @property
    def static_inputs(self) -> bool:
        """Activation scales fixed at build time (calibrated), not computed per token at run time."""
        return self.input_activations is not None and not self.input_activations.dynamic

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe reads calibration data: static activation or KV-cache scales, GPTQ, or
        weight scales searched with the inputs' second moments (imatrix_mse), the input importance
        of imatrix rounding, SmoothQuant's per-channel input maxima, or AWQ's input second moments."""
        return self.static_inputs or self.global_inputs or self.kv_cache_scheme is not None or self.algorithm in ("gptq", "imatrix") \
            or (self.weights is not None and self.weights.observer == "imatrix_mse") or self.smoothing is not None \
            or self.awq is not None

    @property
    def global_inputs(self) -> bool:
        """Activations in run-time groups under a calibrated global scale (NVFP4's input_global_scale)."""
        return self.input_activations is not None and self.input_activations.dynamic == "local"

    @property
    def preset(self) -> str | None:
        """compressed-tensors' FP4 / MX / W4AFP8 preset the recipe is (builder/release/microscaling.py), or None."""
        return microscaling.preset(self) if self.weights is not None else None

    @property
    def packed(self) -> bool:
        """Weights stored packed in int32 words: integer, weight-only or W4AFP8 (compressed-tensors pack-quantized)."""
        return self.format == "compressed-tensors" and self.weights is not None \
            and self.weights.type == "int" and (self.input_activations is None or self.preset == "w4afp8")

    @property
    def scheme_class(self) -> str:
        """The runtime kernel family the recipe needs, as targets name them: w8a8-fp8, w4a16-int, ..."""
        if self.weights is None:
            return "w16a16"
        family = microscaling.family(self)
        if family is not None:
            return family
        acts = self.input_activations
        bits = f"w{self.weights.num_bits}a{acts.num_bits if acts else 16}"
        if self.weights.type == "float":
            return f"{bits}-fp8-block" if self.weights.strategy == "block" else f"{bits}-fp8"
        return f"{bits}-int8" if acts else f"{bits}-int"

    @property
    def compression_format(self) -> str | None:
        """compressed-tensors' format name for the weights (None unless format is compressed-tensors)."""
        if self.format != "compressed-tensors":
            return None
        if self.preset is not None and self.preset != "w4afp8":
            return microscaling.FORMATS[self.preset]
        if self.weights.type == "float":
            return "float-quantized"
        return "pack-quantized" if self.packed else "int-quantized"

    @property
    def kv_cache_dtype(self) -> str:
        """The runtime's KV-cache dtype: fp8 when the recipe quantizes the KV cache, else auto (model dtype)."""
        kv = self.kv_cache_scheme
        return "fp8" if kv is not None and kv.type == "float" and kv.num_bits == 8 else "auto"

    def quantizes(self, module: str, cls: str | None = "Linear") -> bool:
        """Whether the recipe quantizes a module, named by its path and transformers class name."""
        return (self.weights is not None and cls is not None and matches(module, cls, self.targets)
                and not matches(module, cls, self.ignore))

    @property
    def parts(self) -> tuple:
        """The parts of the builder (builder/release/identity.py OUTPUT_VERSIONS) that decide its bytes."""
        found = [f"format.{self.format}"]
        for args in (self.weights, self.input_activations, self.kv_cache_scheme):
            if args is not None:
                found.append(formats.quantizer(self) or args.part)
        if self.algorithm in ("gptq", "imatrix"):
            found.append(self.algorithm)
        if self.gptq is not None and self.gptq.asymmetric:
            found.append("gptq.asymmetric")
        if self.weights is not None and self.weights.observer != "minmax":
            found.append(f"observer.{self.weights.observer}")
        if self.smoothing is not None:
            found.append("smoothing")
        if self.awq is not None:
            found.append("awq")
        if self.ggml_mix is not None:
            found.append("quantize.kquant")  # K-quants and Q5_0/Q5_1 beside the QUANTIZER's Q8_0
        if self.needs_calibration:
            found.append("calibration")
        return tuple(sorted(set(found)))


def problems(recipe: Recipe) -> list:
    """Recipe fields that contradict each other, as (key path, message)."""
    return smoothing_problems(recipe) + mix_problems(recipe) + argument_problems(recipe)


def mix_problems(recipe: Recipe) -> list:
    """llama-quantize's type presets are GGUF file types."""
    if recipe.ggml_mix is not None and recipe.format != "gguf":
        return [(("quant", "ggml_mix"), f"{recipe.ggml_mix}: llama-quantize's presets are for format gguf")]
    return []


def smoothing_problems(recipe: Recipe) -> list:
    """SmoothQuant divides each layer's activations per channel before they are quantized: it needs
    quantized input activations, which only compressed-tensors and the fp8 layout carry. AWQ-style
    scaling is its weight-only counterpart (compressed-tensors), folded into the same norms: one or
    the other."""
    found = []
    if recipe.smoothing is not None and not (recipe.input_activations is not None
                                             and recipe.format in ("compressed-tensors", "fp8")):
        found.append((("quant", "smoothing"), "SmoothQuant moves activation outliers into the weights: it needs "
                      "quantized input_activations (W8A8 or FP8 activations); for weight-only recipes use "
                      "quant.awq"))
    if recipe.awq is not None and recipe.smoothing is not None:
        found.append((("quant", "awq"), "both fold factors into the same norms: use smoothing (SmoothQuant) "
                      "for recipes that quantize activations, awq for weight-only ones"))
    elif recipe.awq is not None and not (recipe.format == "compressed-tensors" and recipe.weights is not None
                                         and recipe.input_activations is None):
        found.append((("quant", "awq"), "AWQ-style scaling protects the weights the activations use most: it is "
                      "for weight-only compressed-tensors recipes (W4A16, W8A16); for quantized activations "
                      "use quant.smoothing"))
    return found


def argument_problems(recipe: Recipe) -> list:
    """The format's and quantization arguments' contradictions, as (key path, message): the recipe's
    format (builder/formats/) says what it holds, handed the rules of compressed-tensors' arithmetic
    (arithmetic_problems) for the formats that round with it."""
    return formats.of(recipe.format).problems(recipe, arithmetic_problems)


def arithmetic_problems(recipe: Recipe) -> list:
    """What compressed-tensors' arithmetic (quantize.float, quantize.int; builder/quant/) rounds: the
    arguments', activations', KV cache's, algorithm's and observers' contradictions."""
    weights, acts, kv = recipe.weights, recipe.input_activations, recipe.kv_cache_scheme
    found = []
    if not recipe.targets:
        found.append((("quant", "targets"), "empty: name the modules to quantize, e.g. [Linear]"))
    for key, args in (("weights", weights), ("input_activations", acts), ("kv_cache_scheme", kv)):
        if args is None:
            continue
        if not args.symmetric:
            found.append((("quant", key, "symmetric"), "false: only symmetric quantization is supported (format mlx writes affine groups)"))
        if args.num_bits == 5:
            found.append((("quant", key, "num_bits"), "5: 5-bit weights are llama.cpp's Q5_K (format gguf, "
                          "ggml_mix Q5_K_M); compressed-tensors recipes take 4 or 8"))
        elif args.type == "float" and args.num_bits != 8 and not microscaling.claims(recipe):
            found.append((("quant", key, "num_bits"), f"{args.num_bits}: float quantization is FP8 E4M3 (8)"))
        if args.strategy == "block" and key != "weights":
            found.append((("quant", key, "strategy"), "block: 2-D blocks are for weights; use tensor, group "
                          "or token"))
        if (args.strategy == "block") != (args.block_structure is not None):
            found.append((("quant", key, "block_structure"), f"{args.block_structure}: block_structure is "
                          "required with strategy block and not allowed otherwise"))
        if (args.strategy in ("group", "tensor_group")) != (args.group_size is not None):
            found.append((("quant", key, "group_size"), f"{args.group_size}: group_size is "
                          "required with strategy group and not allowed otherwise"))
    if weights.dynamic or weights.strategy == "token":
        found.append((("quant", "weights"), "weights are quantized once at build time: "
                      "dynamic false and strategy tensor, channel, group or block"))
    if weights.strategy == "block":
        found += block_recipe_problems(recipe)
    presets = microscaling.claims(recipe)  # FP4, MX and W4AFP8: compressed-tensors' presets, their own rules
    if presets:
        found += microscaling.preset_problems(recipe)
    if acts is not None and not presets:
        if acts.num_bits != 8:
            found.append((("quant", "input_activations", "num_bits"), f"{acts.num_bits}: activations are 8-bit"))
        if weights.strategy != "block" and acts.strategy not in (("token", "tensor") if acts.dynamic else ("tensor",)):
            found.append((("quant", "input_activations", "strategy"), f"{acts.strategy}: dynamic activations "
                          "use token or tensor, static ones tensor (one calibrated scale)"))
        if weights.num_bits != 8:
            found.append((("quant", "weights", "num_bits"), f"{weights.num_bits}: 4-bit weights are "
                          "weight-only (input_activations null)"))
    if kv is not None and (kv.type, kv.strategy, kv.dynamic) != ("float", "tensor", False):
        found.append((("quant", "kv_cache_scheme"), "the KV cache takes FP8 per-tensor static scales: "
                      "type float, strategy tensor, dynamic false"))
    if recipe.algorithm is None:
        found.append((("quant", "algorithm"), "null: a quantized recipe needs rtn or gptq"))
    if recipe.algorithm == "imatrix":
        found.append((("quant", "algorithm"), "imatrix: importance-weighted rounding is llama.cpp's Q4_0 "
                      "scale search; use it with format gguf"))
    if (recipe.algorithm == "gptq") != (recipe.gptq is not None):
        found.append((("quant", "gptq"), "GPTQ settings are required with algorithm gptq and not allowed otherwise"))
    if recipe.gptq is not None and recipe.gptq.asymmetric and recipe.awq is not None:
        found.append((("quant", "gptq", "asymmetric"), "true: not with awq (its factors rescale the inputs "
                      "GPTQ's sums are made of; the source model's stream would need them too): set false or drop awq"))
    for key, args in (("input_activations", acts), ("kv_cache_scheme", kv)):
        if args is not None and (args.observer != "minmax" or args.settings):
            found.append((("quant", key, "observer"), f"{args.observer}: scale search is for weights; "
                          "activation and KV-cache scales are max |x| (minmax, no observer_kwargs)"))
    unknown = sorted(set(weights.settings) - set(OBSERVERS[weights.observer]))
    if unknown:
        allowed = ", ".join(sorted(OBSERVERS[weights.observer])) or "none"
        found.append((("quant", "weights", "observer_kwargs"), f"{', '.join(unknown)}: not a setting of "
                      f"observer {weights.observer} (allowed: {allowed})"))
    return found



def block_recipe_problems(recipe: Recipe) -> list:
    """Block-wise FP8 weights (compressed-tensors' FP8_BLOCK; builder/quant/blocks.py): FP8 E4M3, rounded
    to nearest with max |w| per block (GPTQ's column loop and the scale searches work per row or group),
    with activations quantized at run time per token in groups as wide as a block (what vLLM's block
    kernels take; its legacy fp8 loader refuses static activations with blocks)."""
    weights, acts = recipe.weights, recipe.input_activations
    found = []
    if weights.type != "float":
        found.append((("quant", "weights", "type"), f"{weights.type}: block-wise weights are FP8 (type float)"))
    if recipe.algorithm != "rtn":
        found.append((("quant", "algorithm"), f"{recipe.algorithm}: block-wise FP8 weights are rounded to nearest "
                      "(rtn); GPTQ is for tensor, channel and group scales"))
    if weights.observer != "minmax":
        found.append((("quant", "weights", "observer"), f"{weights.observer}: block scales are max |w| per block "
                      "(minmax)"))
    if recipe.smoothing is not None:
        found.append((("quant", "smoothing"), "SmoothQuant is not run with block-wise FP8 weights"))
    columns = (weights.block_structure or (None, None))[1]
    if acts is None or (acts.type, acts.strategy, acts.dynamic, acts.group_size) != ("float", "group", True, columns):
        found.append((("quant", "input_activations"), f"block-wise FP8 weights take FP8 activations quantized at "
                      f"run time per token in groups of the block's columns: type float, strategy group, "
                      f"group_size {columns}, dynamic true"))
    return found
