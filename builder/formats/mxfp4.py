"""Format mxfp4: gpt-oss's own MXFP4 experts (`quant_method: mxfp4`, `<name>_blocks` / `<name>_scales`). The
layout OpenAI publishes gpt-oss in, which vLLM's gpt-oss loader and transformers' Mxfp4 quantizer read. Only
the fused experts are quantized: each
`mlp.experts.gate_up_proj` [E, hidden, 2 x inter] and `down_proj` [E, inter, hidden] (the BF16 checkpoint's
[E, in, out]) becomes `<name>_blocks` U8 [E, out, in / 32, 16] (E2M1 codes two a byte, the first in the low
nibble) and `<name>_scales` U8 [E, out, in / 32] (E8M0 exponents, bias 127); rows are the BF16 columns in
order (gate and up stay interleaved). Attention, router, sinks, expert biases, embeddings and lm_head stay
in the recipe's dtype, as `modules_to_not_convert` says. The rounding is the builder's MXFP4 (quant/mx.py,
compressed-tensors' generate_mx_scales, the mxfp4a16 recipe's), so requantizing weights dequantized from a
published MXFP4 checkpoint gives back the same values.

    builder build <gpt-oss release> with quant=gpt-oss-mxfp4     (vLLM: quant_method mxfp4; CC >= 8.0)
"""

from pathlib import Path

from builder.formats import compressed_tensors, dense
from builder.tensorfile import Output

VERSION = 1            # gpt-oss's `<name>_blocks` / `<name>_scales` layout and its quantization_config
PACKAGES = ()
QUANTIZER = None       # compressed-tensors' MX arithmetic (quantize.rounded's microscaled branch)
FAMILIES = {"gpt_oss": "GptOssForCausalLM"}
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = "mxfp4"
SCALES = ("_scales",)
# transformers' fused experts module -> its parameters this format quantizes as they are ([E, in, out])
FUSED = {"GptOssExperts": ("gate_up_proj", "down_proj")}
GROUP = 32
# what openai/gpt-oss-20b's and -120b's config.json name as kept in BF16 (transformers' Mxfp4Config reads
# modules_to_not_convert; vLLM's Mxfp4Config quantizes only the experts whatever it says)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def problems(recipe, rules) -> list:
    """compressed-tensors' rules, and what the layout holds: MXFP4 weights (the mxfp4a16 preset), rounded to
    nearest, of gpt-oss's experts only, with nothing else quantized."""
    found = compressed_tensors.problems(recipe, rules)
    args = recipe.weights
    if args is None:
        return found
    if not (args.type == "float" and args.num_bits == 4 and args.microscaled and args.group_size == GROUP):
        found.append((("quant", "weights"), "format mxfp4 holds MXFP4 weights only (FP4 E2M1, strategy group, "
                      "group_size 32, scale_dtype uint8: specs/quant/gpt-oss-mxfp4.yaml)"))
    if recipe.input_activations is not None or recipe.kv_cache_scheme is not None:
        found.append((("quant", "input_activations"), "format mxfp4 is weight-only (vLLM runs gpt-oss's MXFP4 "
                      "experts with BF16 activations); set input_activations and kv_cache_scheme to null"))
    if list(recipe.targets) != list(FUSED):
        found.append((("quant", "targets"), f"{list(recipe.targets)}: format mxfp4 quantizes gpt-oss's fused "
                      f"experts only (targets: {list(FUSED)}); vLLM's mxfp4 loader reads every Linear unquantized"))
    if recipe.algorithm != "rtn":
        found.append((("quant", "algorithm"), f"{recipe.algorithm}: format mxfp4 rounds to nearest (rtn); GPTQ "
                      "needs the experts one Linear each, which gpt-oss's layout does not hold"))
    return found


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization_config", {}).get("quant_method") == "mxfp4"


def load(folder: Path, config: dict | None, decode=None):
    """Through transformers' own Mxfp4 quantizer, dequantizing (what it does on a CPU in any case), in FP32."""
    from transformers import Mxfp4Config
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # not its warning that a CPU dequantizes: that is what is asked for
    try:
        model = dense.load(folder, config, quantization_config=Mxfp4Config(dequantize=True))
    finally:
        logging.set_verbosity(level)
    return dense.widened(model)


def prepare(path: Path, config: dict, spec: dict) -> dict:
    return dense.prepare(path, config, spec)


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    """A targeted fused parameter [E, in, out] becomes its blocks and scales; anything else is kept."""
    import torch

    if not targeted:
        return dense.plan(name, dtype, shape, targeted, recipe)
    count, columns, rows = shape
    return [Output(f"{name}_blocks", torch.uint8, (count, rows, columns // GROUP, GROUP // 2)),
            Output(f"{name}_scales", torch.uint8, (count, rows, columns // GROUP))]


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return {}  # nothing of a targeted parameter is known without its values


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    """Each expert's [out, in] weight rounded by the MX arithmetic, its codes packed two a byte."""
    import torch

    from builder import minifloat  # (torch: not at import time)

    count, columns, rows = tensor.shape
    blocks = torch.empty((count, rows, columns // GROUP, GROUP // 2), dtype=torch.uint8)
    scales = torch.empty((count, rows, columns // GROUP), dtype=torch.uint8)
    for expert in range(count):
        codes, exponents = arithmetic.weight(name, tensor[expert].t(), torch.uint8)
        blocks[expert] = minifloat.pairs(codes).reshape(rows, columns // GROUP, GROUP // 2)
        scales[expert] = exponents
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def config(source: dict, recipe, routers: list = ()) -> dict:
    """config.json: the source's, normalised, with gpt-oss's own quantization_config."""
    return {**dense.normalised(source, recipe),
            "quantization_config": {"modules_to_not_convert": NOT_CONVERTED, "quant_method": "mxfp4"}}
