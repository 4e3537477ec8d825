"""Format compressed-tensors: what llm-compressor writes and vLLM loads. Quantized Linears as `weight`
(FP8 E4M3, per tensor, channel or 2-D block, or INT8) or `weight_packed` (INT4/INT8 in int32 words, weight-only) with `weight_scale`,
`input_scale` for calibrated activations and `k_scale`/`v_scale` for an FP8 KV cache; config.json's
quantization_config as compressed-tensors' own models dump it. FP4 weights (nvfp4-pack-quantized,
mxfp4-pack-quantized) are `weight_packed` U8, two E2M1 codes a byte, with `weight_scale` F8_E4M3 (NVFP4,
plus F32 `weight_global_scale` and, with FP4 activations, `input_global_scale`) or U8 E8M0 exponents
(MX); MXFP8 (mxfp8-quantized) is `weight` F8_E4M3 with U8 exponents. Experts the source keeps fused
(Llama 4, Granite 4) are written one Linear per expert (formats/experts.py), each quantized as any Linear.

    builder build smollm2-135m-instruct-fp8-dynamic
"""

from pathlib import Path

from builder.formats import dense, experts
from builder.tensorfile import Output, index_of

VERSION = 1            # tensor names, packing and quantization_config
PACKAGES = ("compressed-tensors",)  # its version is written into config.json
QUANTIZER = None       # compressed-tensors' arithmetic: quantize.float, quantize.int
FAMILIES = None
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = "compressed-tensors"
SCALES = ("_scale",)   # weight_scale, input_scale, k_scale, v_scale
# QuantizationArgs fields a recipe does not set, with the values compressed-tensors 0.17 writes for them.
QUANTIZATION_ARGS_DEFAULTS = {"actorder": None, "block_structure": None, "observer_kwargs": {},
                              "scale_dtype": None, "zp_dtype": None}
PACK_BITS = 32  # sub-8-bit weights are packed into int32 words (pack-quantized)
PACK_ELEMENTS = 1 << 16  # values packed at a time: its byte-sized temporaries stay below glibc's mmap threshold


def problems(recipe, rules) -> list:
    """Quantized weights, within what compressed-tensors' arithmetic (rules) rounds."""
    if recipe.weights is None:
        return [(("quant", "weights"), f"format {recipe.format} needs weight quantization arguments")]
    return rules(recipe)


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"


def load(folder: Path, config: dict | None, decode=None):
    """Dequantized by compressed-tensors while loading (activations still fake-quantized in forward), in
    FP32 like every loaded model: its FP4 and MX decompressors return BF16 weights and scales whatever
    the model's dtype, which FP32 activations cannot multiply; widening them is exact. Experts in a layout only
    vLLM reads (gpt-oss's, formats/experts.py) are decompressed into transformers' fused parameters; such an
    artifact that leaves anything else unread is refused."""
    import warnings

    from transformers.utils import logging
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tensors = index_of(sorted(folder.glob("*.safetensors")))  # the artifact's tensors, every shard
    unread, verbosity = experts.unread(tensors), logging.get_verbosity()
    if unread:  # its load report lists the experts filled below, which are no news
        logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), experts.reading(config):  # split experts read back (Granite 4)
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # dequantize=True is the point
            model, info = dense.load(folder, config, quantization_config=CompressedTensorsConfig(dequantize=True),
                                     output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    left = set(info["missing_keys"]) - experts.filled(model, tensors, config)  # gpt-oss's: only vLLM reads them
    if unread and left:
        raise ValueError(f"{folder}: transformers left {', '.join(sorted(left)[:3])} unread")
    return dense.widened(model)


def prepare(path: Path, config: dict, spec: dict) -> dict:
    return dense.prepare(path, config, spec)


def scale_format(recipe) -> tuple:
    """(torch dtype, shape of a per-tensor scale): compressed-tensors stores [1] in the model's dtype."""
    import torch

    return getattr(torch, recipe.dtype), (1,)


def kv_name(key: str, projection: str, single: bool) -> str:
    """The artifact name of a KV-cache scale: its layer's self_attn.k_scale / v_scale (key), as vLLM loads it."""
    return key


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    return outputs(name, dtype, shape, targeted, recipe, kv, scale_format(recipe))


def outputs(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list, scales: tuple) -> list:
    """The tensors one source tensor becomes, without computing them (kv: its (key, artifact name)
    KV-cache scales; scales: the format's scale_format())."""
    import torch

    scale_dtype, scalar = scales
    extra = [Output(artifact_name, scale_dtype, scalar) for _, artifact_name in kv]
    if not targeted:
        return [dense.stored(name, dtype, shape, recipe), *extra]
    if experts.fused(name, shape):  # one Linear per expert, each quantized unless the recipe leaves it out
        return [Output(written, found.dtype, found.shape) for module, linear in experts.linears(name, shape)
                for found in outputs(f"{module}.weight", dtype, linear, recipe.quantizes(module), recipe, [], scales)
                if (written := experts.written(found.name))]
    args, module = recipe.weights, name[: -len(".weight")]
    rows, columns = shape
    if args.type == "float" and (args.strategy == "tensor_group" or args.microscaled):
        return fp4_outputs(module, recipe, rows, columns) + extra
    if recipe.packed:
        words = -(-columns // (PACK_BITS // args.num_bits))
        found = [Output(f"{module}.weight_packed", torch.int32, (rows, words)),
                 Output(f"{module}.weight_shape", torch.int64, (2,))]
    else:
        found = [Output(name, torch.float8_e4m3fn if args.type == "float" else torch.int8, tuple(shape))]
    if args.strategy == "tensor":
        scale_shape = scalar
    elif args.strategy == "channel":
        scale_shape = (rows, 1)
    elif args.strategy == "block":  # partial blocks at the edges have scales of their own
        height, width = args.block_structure
        scale_shape = (-(-rows // height), -(-columns // width))
    else:  # group
        scale_shape = (rows, columns // args.group_size)
    found.append(Output(f"{module}.weight_scale", scale_dtype, scale_shape))
    if recipe.static_inputs:
        found.append(Output(f"{module}.input_scale", scale_dtype, scalar))
    return found + extra


def fp4_outputs(module: str, recipe, rows: int, columns: int) -> list:
    """A targeted Linear's tensors under NVFP4 and MX: packed E2M1 codes (or MXFP8's values), group scales
    (FP8 or E8M0 exponents), NVFP4's FP32 global scales."""
    import torch

    args = recipe.weights
    groups = (rows, columns // args.group_size)
    if args.num_bits == 4:
        found = [Output(f"{module}.weight_packed", torch.uint8, (rows, columns // 2))]
    else:
        found = [Output(f"{module}.weight", torch.float8_e4m3fn, (rows, columns))]
    found.append(Output(f"{module}.weight_scale", torch.uint8 if args.microscaled else torch.float8_e4m3fn, groups))
    if args.strategy == "tensor_group":
        found.append(Output(f"{module}.weight_global_scale", torch.float32, (1,)))
    if recipe.global_inputs:
        found.append(Output(f"{module}.input_global_scale", torch.float32, (1,)))
    return found


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return known_outputs(name, shape, targeted, recipe, calibration, kv, arithmetic, scale_format(recipe))


def known_outputs(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic,
                  scales: tuple) -> dict:
    """The tensors of outputs() that need no source values, computed: a KV-cache projection's scale and
    a weight's input scale (from calibration), a packed weight's `weight_shape`. Written before any
    tensor is read: the I64 `weight_shape`s lead the file, so its hash need not wait for the last one."""
    import torch

    scale_dtype, scalar = scales
    if targeted and experts.fused(name, shape):
        return experts.as_written({key: value for module, linear in experts.linears(name, shape)
                                   if recipe.quantizes(module) for key, value in known_outputs(
                                       f"{module}.weight", linear, True, recipe, calibration, [], arithmetic,
                                       scales).items()})
    found = {}
    for key, artifact_name in kv:
        found[artifact_name] = arithmetic.scale(calibration.kv_amax[key], recipe.kv_cache_scheme,
                                                scale_dtype).reshape(scalar)
    if not targeted:
        return found
    module = name[: -len(".weight")]
    if recipe.packed:
        found[f"{module}.weight_shape"] = torch.tensor(tuple(shape), dtype=torch.int64)
    if recipe.static_inputs:
        amax = calibration.input_amax[module]
        found[f"{module}.input_scale"] = arithmetic.scale(amax, recipe.input_activations, scale_dtype).reshape(scalar)
    if recipe.global_inputs:  # q/k/v and gate/up read one input: their maxima, so their global scales, agree
        amax = calibration.input_amax[module]
        found[f"{module}.input_global_scale"] = arithmetic.scale(amax, recipe.input_activations, scale_dtype)
    return found


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    return computed(name, tensor, recipe, arithmetic, scale_format(recipe))


def computed(name: str, tensor, recipe, arithmetic, scales: tuple) -> dict:
    """A targeted weight's tensors of outputs() (not known_outputs()): rounded by the arithmetic
    (GPTQ's values and searched scales where calibration has them), packed when weight-only integer."""
    import torch

    from builder import minifloat  # (torch: not at import time)

    if experts.fused(name, tuple(tensor.shape)):  # each expert's Linears, as the Linears they are
        found = {}
        for module, weight in experts.split(name, tensor).items():
            if recipe.quantizes(module):
                found.update(computed(f"{module}.weight", weight, recipe, arithmetic, scales))
            else:
                arithmetic.finite(f"{module}.weight", weight)
                found[f"{module}.weight"] = weight.to(getattr(torch, recipe.dtype))  # as dense.stored writes it
        return experts.as_written(found)
    scale_dtype, scalar = scales
    args, module = recipe.weights, name[: -len(".weight")]
    values, scale, *global_scale = arithmetic.weight(name, tensor, scale_dtype)  # NVFP4: and its global scale
    if args.type == "float" and args.num_bits == 4:  # E2M1 codes, two a byte, the first in the low nibble
        found = {f"{module}.weight_packed": minifloat.pairs(values)}
    else:
        found = {f"{module}.weight_packed": pack(values, args.num_bits)} if recipe.packed else {name: values}
    found[f"{module}.weight_scale"] = scale.reshape(scalar) if args.strategy == "tensor" else scale
    if global_scale:
        found[f"{module}.weight_global_scale"] = global_scale[0]
    return found


def pack(values, num_bits: int):
    """Signed num_bits integers (int8 tensor [rows, columns]) packed into int32 words along columns.

    Each value is offset to unsigned (+2^(num_bits-1)); value j of a word sits at bits
    num_bits*j (little end first); the last word is zero-padded. compressed-tensors' pack-quantized.
    Built a byte at a time (num_bits divides 8: the schema allows 4 and 8): the bytes of a word,
    little-endian as safetensors stores them, are its value. Whole rows of PACK_ELEMENTS values at a time.
    """
    import torch

    per_byte, per_word = 8 // num_bits, PACK_BITS // num_bits
    mask, half = (1 << num_bits) - 1, 1 << (num_bits - 1)
    rows, columns = values.shape
    words = torch.empty((rows, -(-columns // per_word)), dtype=torch.int32)
    step = max(1, PACK_ELEMENTS // max(1, columns))
    for block in (slice(start, min(start + step, rows)) for start in range(0, rows, step)):
        # v + 2^(b-1) in b bits is v's low b bits with the top one flipped (two's complement)
        unsigned = values[block].view(torch.uint8).bitwise_and(mask).bitwise_xor_(half)
        if columns % per_word:
            unsigned = torch.nn.functional.pad(unsigned, (0, -columns % per_word))
        unsigned = unsigned.reshape(len(unsigned), -1, per_byte)
        packed = unsigned[..., 0].clone()
        for index in range(1, per_byte):
            packed.bitwise_or_(unsigned[..., index].bitwise_left_shift(num_bits * index))
        words[block] = packed.view(torch.int32)
    return words


def quantization_config(recipe, routers: list = ()) -> dict:
    """config.json's quantization_config exactly as compressed-tensors writes it.

    Written as data rather than through compressed-tensors' pydantic models, whose import costs a
    build ~2 s and ~140 MB (it loads torch.compile); tests/test_export.py holds every recipe's result
    equal to what those models validate and dump. routers: MoE router modules, listed in ignore as
    llm-compressor lists them (vLLM builds some routers as quantizable Linears: Qwen-MoE's gate).
    """
    from importlib import metadata

    weights = quantization_args(recipe.weights)
    if recipe.algorithm == "gptq":  # compressed-tensors records GPTQ's column order with the weights
        weights["actorder"] = recipe.gptq.actorder
    # W4AFP8: compressed-tensors infers int-quantized for integer weights with activations unless the
    # scheme names its format (vLLM's W4A8 kernels read pack-quantized weights)
    scheme = {"format": recipe.compression_format if recipe.preset == "w4afp8" else None,
              "input_activations": quantization_args(recipe.input_activations),
              "output_activations": None, "targets": list(recipe.targets), "weights": weights}
    return {"config_groups": {"group_0": scheme}, "format": recipe.compression_format,
            "global_compression_ratio": None, "ignore": [*recipe.ignore, *routers],
            "kv_cache_scheme": quantization_args(recipe.kv_cache_scheme),
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": metadata.version("compressed-tensors")}


def quantization_args(args) -> dict | None:
    """compressed-tensors' QuantizationArgs as it serialises them: defaults filled in, no observer for
    dynamic (run-time) scales, and a searched weight observer with the settings it ran with."""
    if args is None:
        return None
    if args.observer != "minmax":
        return {**QUANTIZATION_ARGS_DEFAULTS, **args.as_dict(), "observer": args.observer,
                "observer_kwargs": args.search}
    observer = "static_minmax" if args.dynamic == "local" else None if args.dynamic else "memoryless_minmax"
    return {**QUANTIZATION_ARGS_DEFAULTS, **args.as_dict(), "observer": observer}


def config(source: dict, recipe, routers: list = ()) -> dict:
    """config.json: the source's, normalised, with quantization_config."""
    return {**dense.normalised(source, recipe), "quantization_config": quantization_config(recipe, routers)}
