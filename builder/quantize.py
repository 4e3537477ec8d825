"""Quantize one tensor at a time with compressed-tensors' arithmetic (symmetric scales)."""

from dataclasses import dataclass

import torch

from builder.patterns import matches

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# The key and value projections whose outputs fill the KV cache, and the scale names vLLM loads.
KV_PROJECTIONS = {"self_attn.k_proj": "self_attn.k_scale", "self_attn.v_proj": "self_attn.v_scale"}
PACK_BITS = 32  # sub-8-bit weights are packed into int32 words (compressed-tensors pack-quantized)


@dataclass(frozen=True)
class Output:
    """One tensor the artifact will hold: its name, torch dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple


def targeted(tensor_name: str, shape: tuple, modules: dict, quant: dict) -> bool:
    """Whether a checkpoint tensor is the weight of a module the recipe quantizes."""
    if quant["weights"] is None or not tensor_name.endswith(".weight") or len(shape) != 2:
        return False
    module = tensor_name[: -len(".weight")]
    cls = modules.get(module)
    return cls is not None and matches(module, cls, quant["targets"]) and not matches(module, cls, quant["ignore"])


def packed(quant: dict) -> bool:
    """Whether weights are stored packed: integer, weight-only (compressed-tensors pack-quantized)."""
    return quant["format"] == "compressed-tensors" and quant["weights"]["type"] == "int" \
        and quant["input_activations"] is None


def static_inputs(quant: dict) -> bool:
    acts = quant["input_activations"]
    return acts is not None and not acts["dynamic"]


def kv_scale_key(tensor_name: str, quant: dict) -> str | None:
    """The KV-cache scale a k_proj/v_proj weight carries, by its compressed-tensors name
    (…self_attn.k_scale / v_scale, as calibration records it); None for other tensors."""
    if quant.get("kv_cache_scheme") is None or not tensor_name.endswith(".weight"):
        return None
    module = tensor_name[: -len(".weight")]
    for projection, scale in KV_PROJECTIONS.items():
        if module.endswith("." + projection):
            return module[: -len(projection)] + scale
    return None


def kv_scale_name(tensor_name: str, quant: dict) -> str | None:
    """The KV-cache scale's name in the artifact: compressed-tensors' self_attn.k_scale, or AutoFP8's
    k_proj.output_scale in the legacy fp8 layout (vLLM maps both to attn.k_scale)."""
    key = kv_scale_key(tensor_name, quant)
    if key is None or quant["format"] != "fp8":
        return key
    return tensor_name[: -len(".weight")] + ".output_scale"


def layout(name: str, dtype: torch.dtype, shape: tuple, is_targeted: bool, quant: dict) -> list:
    """The tensors one source tensor becomes, without computing them."""
    out_dtype = DTYPES[quant["dtype"]]
    scale_dtype, scalar = scale_format(quant)
    kv_name = kv_scale_name(name, quant)
    extra = [Output(kv_name, scale_dtype, scalar)] if kv_name else []
    if not is_targeted:
        return [Output(name, out_dtype if dtype.is_floating_point else dtype, tuple(shape)), *extra]
    args = quant["weights"]
    module = name[: -len(".weight")]
    if packed(quant):
        rows, columns = shape
        words = -(-columns // (PACK_BITS // args["num_bits"]))
        found = [Output(f"{module}.weight_packed", torch.int32, (rows, words)),
                 Output(f"{module}.weight_shape", torch.int64, (2,))]
    else:
        found = [Output(name, quantized_dtype(args), tuple(shape))]
    weight_scale_shape = scalar if args["strategy"] == "tensor" else scale_shape(tuple(shape), args)
    found.append(Output(f"{module}.weight_scale", scale_dtype, weight_scale_shape))
    if static_inputs(quant):
        found.append(Output(f"{module}.input_scale", scale_dtype, scalar))
    return found + extra


def scale_format(quant: dict) -> tuple:
    """(dtype, shape of a per-tensor scale): compressed-tensors stores [1] in the model's dtype;
    the legacy fp8 layout stores F32 scalars (shape [])."""
    if quant["format"] == "fp8":
        return torch.float32, ()
    return DTYPES[quant["dtype"]], (1,)


def compute(name: str, tensor: torch.Tensor, is_targeted: bool, quant: dict, calibration: dict | None = None) -> dict:
    """The tensors of layout(), computed: name -> tensor.

    calibration (builder.calibrate.calibrate's result) supplies activation and KV-cache maxima and
    GPTQ's integer weights; recipes without calibration pass None.
    """
    out_dtype = DTYPES[quant["dtype"]]
    scale_dtype, scalar = scale_format(quant)
    found = {}
    kv_name = kv_scale_name(name, quant)
    if kv_name:
        amax = calibration["kv_amax"][kv_scale_key(name, quant)]
        found[kv_name] = scale_from_amax(amax, quant["kv_cache_scheme"]).to(scale_dtype).reshape(scalar)
    if not is_targeted:
        found[name] = tensor.to(out_dtype) if tensor.is_floating_point() else tensor
        return found
    args = quant["weights"]
    module = name[: -len(".weight")]
    gptq = (calibration or {}).get("gptq", {}).get(module)
    if gptq is not None:
        values, scale = gptq
        scale = scale.to(scale_dtype)
    else:
        weight = tensor.to(torch.float32)
        scale = scale_from_amax(grouped_amax(weight, args), args).to(scale_dtype)
        values = quantize_weight(weight, scale.to(torch.float32), args)
    if packed(quant):
        found[f"{module}.weight_packed"] = pack(values, args["num_bits"])
        found[f"{module}.weight_shape"] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)
    else:
        found[name] = values
    found[f"{module}.weight_scale"] = scale.reshape(scalar) if args["strategy"] == "tensor" else scale
    if static_inputs(quant):
        amax = calibration["input_amax"][module]
        found[f"{module}.input_scale"] = scale_from_amax(amax, quant["input_activations"]).to(scale_dtype).reshape(scalar)
    return found


def quantized_dtype(args: dict) -> torch.dtype:
    return FP8 if args["type"] == "float" else torch.int8


def value_range(args: dict) -> tuple:
    """(q_min, q_max) of the quantized type."""
    if args["type"] == "float":
        return -FP8_MAX, FP8_MAX
    return -(2 ** (args["num_bits"] - 1)), 2 ** (args["num_bits"] - 1) - 1


def scale_shape(shape: tuple, args: dict) -> tuple:
    rows, columns = shape
    if args["strategy"] == "tensor":
        return (1,)
    if args["strategy"] == "channel":
        return (rows, 1)
    return (rows, columns // args["group_size"])  # group


def grouped_amax(weight: torch.Tensor, args: dict) -> torch.Tensor:
    """Largest magnitude per scale cell (exact: a max, not a sum), in one pass without temporaries."""
    def max_abs(values, **dims):
        return torch.linalg.vector_norm(values, ord=float("inf"), **dims)

    if args["strategy"] == "tensor":
        return max_abs(weight).reshape(1)
    if args["strategy"] == "channel":
        return max_abs(weight, dim=1, keepdim=True)
    rows, columns = weight.shape
    return max_abs(weight.reshape(rows, columns // args["group_size"], args["group_size"]), dim=-1)


def scale_from_amax(amax: torch.Tensor, args: dict) -> torch.Tensor:
    """Symmetric scale = amax / ((q_max - q_min) / 2), as compressed-tensors computes it; 1 where amax is 0."""
    q_min, q_max = value_range(args)
    scale = amax.to(torch.float32) / ((q_max - q_min) / 2)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def weight_scale(weight: torch.Tensor, args: dict) -> torch.Tensor:
    """The weight's scales, one per tensor, channel or group."""
    return scale_from_amax(grouped_amax(weight, args), args)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, args: dict) -> torch.Tensor:
    """round(w / scale) clamped to the type's range, using the scale exactly as stored."""
    if args["strategy"] == "group":
        scale = scale.repeat_interleave(args["group_size"], dim=1)
    q_min, q_max = value_range(args)
    scaled = weight / scale  # the one temporary: rounding and clamping happen in place
    if args["type"] == "float":
        return scaled.clamp_(q_min, q_max).to(FP8)
    return scaled.round_().clamp_(q_min, q_max).to(torch.int8)


def pack(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed num_bits integers (int8 tensor [rows, columns]) packed into int32 words along columns.

    Each value is offset to unsigned (+2^(num_bits-1)); value j of a word sits at bits
    num_bits*j (little end first); the last word is zero-padded. compressed-tensors' pack-quantized.
    """
    per_word = PACK_BITS // num_bits
    rows, columns = values.shape
    unsigned = values.to(torch.int64) + (1 << (num_bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, -columns % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # two's complement


def compression_format(quant: dict) -> str:
    """compressed-tensors' format name for the recipe's weights."""
    if quant["weights"]["type"] == "float":
        return "float-quantized"
    return "pack-quantized" if packed(quant) else "int-quantized"
