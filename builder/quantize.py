"""Quantize one tensor at a time with compressed-tensors' arithmetic (symmetric scales)."""

from dataclasses import dataclass

import torch

from builder.patterns import matches

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


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


def layout(name: str, dtype: torch.dtype, shape: tuple, is_targeted: bool, quant: dict) -> list:
    """The tensors one source tensor becomes, without computing them."""
    out_dtype = DTYPES[quant["dtype"]]
    if not is_targeted:
        return [Output(name, out_dtype if dtype.is_floating_point else dtype, tuple(shape))]
    args = quant["weights"]
    module = name[: -len(".weight")]
    return [Output(name, quantized_dtype(args), tuple(shape)),
            Output(f"{module}.weight_scale", out_dtype, scale_shape(tuple(shape), args))]


def compute(name: str, tensor: torch.Tensor, is_targeted: bool, quant: dict) -> dict:
    """The tensors of layout(), computed: name -> tensor."""
    out_dtype = DTYPES[quant["dtype"]]
    if not is_targeted:
        return {name: tensor.to(out_dtype) if tensor.is_floating_point() else tensor}
    args = quant["weights"]
    weight = tensor.to(torch.float32)
    scale = weight_scale(weight, args).to(out_dtype)
    module = name[: -len(".weight")]
    return {name: quantize_weight(weight, scale.to(torch.float32), args),
            f"{module}.weight_scale": scale}


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
    """Largest magnitude per scale cell (exact: a max, not a sum)."""
    magnitude = weight.abs()
    if args["strategy"] == "tensor":
        return magnitude.amax().reshape(1)
    if args["strategy"] == "channel":
        return magnitude.amax(dim=1, keepdim=True)
    rows, columns = weight.shape
    return magnitude.reshape(rows, columns // args["group_size"], args["group_size"]).amax(dim=-1)


def weight_scale(weight: torch.Tensor, args: dict) -> torch.Tensor:
    """Symmetric scale = amax / ((q_max - q_min) / 2), as compressed-tensors computes it; 1 where amax is 0."""
    q_min, q_max = value_range(args)
    scale = grouped_amax(weight, args) / ((q_max - q_min) / 2)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, args: dict) -> torch.Tensor:
    """round(w / scale) clamped to the type's range, using the scale exactly as stored."""
    if args["strategy"] == "group":
        scale = scale.repeat_interleave(args["group_size"], dim=1)
    q_min, q_max = value_range(args)
    scaled = weight / scale
    if args["type"] == "float":
        return scaled.clamp(q_min, q_max).to(FP8)
    return torch.round(scaled).clamp(q_min, q_max).to(torch.int8)


def compression_format(quant: dict) -> str:
    """compressed-tensors' format name for the recipe's weights."""
    return "float-quantized" if quant["weights"]["type"] == "float" else "int-quantized"
