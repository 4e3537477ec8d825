"""Quantize one tensor at a time with compressed-tensors' arithmetic (symmetric scales)."""

import torch

from builder.errors import BuilderError, Problem
from builder.spec import families
from builder.spec.recipe import Args, Recipe
from builder.tensorfile import Output

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8 = torch.float8_e4m3fn
PACK_BITS = 32  # sub-8-bit weights are packed into int32 words (compressed-tensors pack-quantized)


def targeted(tensor_name: str, shape: tuple, modules: dict, recipe: Recipe) -> bool:
    """Whether a checkpoint tensor is the weight of a module the recipe quantizes."""
    if recipe.weights is None or not tensor_name.endswith(".weight") or len(shape) != 2:
        return False
    module = tensor_name[: -len(".weight")]
    return recipe.quantizes(module, modules.get(module))


def kv_scales(tensor_name: str, family, recipe: Recipe) -> list:
    """[(calibration key, artifact name)] of the KV-cache scales a checkpoint tensor carries: its layer's
    self_attn.k_scale and/or v_scale (the names compressed-tensors and vLLM load) on the weight of the
    projection that makes them (k_proj, v_proj; or qkv_proj, which makes both, for fused families).
    The legacy fp8 layout names them AutoFP8's way, k_proj.output_scale, where there is a k_proj."""
    if recipe.kv_cache_scheme is None or not tensor_name.endswith(".weight"):
        return []
    module = tensor_name[: -len(".weight")]
    for projection, scales in families.kv_sources(family).items():
        if module.endswith("." + projection):
            layer = module[: -len(projection)]
            legacy = recipe.format == "fp8" and len(scales) == 1
            return [(layer + scale, module + ".output_scale" if legacy else layer + scale) for scale in scales]
    return []


def layout(name: str, dtype: torch.dtype, shape: tuple, is_targeted: bool, recipe: Recipe, kv: list = ()) -> list:
    """The tensors one source tensor becomes, without computing them (kv: its kv_scales())."""
    out_dtype = DTYPES[recipe.dtype]
    scale_dtype, scalar = scale_format(recipe)
    extra = [Output(artifact_name, scale_dtype, scalar) for _, artifact_name in kv]
    if not is_targeted:
        return [Output(name, out_dtype if dtype.is_floating_point else dtype, tuple(shape)), *extra]
    args = recipe.weights
    module = name[: -len(".weight")]
    if recipe.packed:
        rows, columns = shape
        words = -(-columns // (PACK_BITS // args.num_bits))
        found = [Output(f"{module}.weight_packed", torch.int32, (rows, words)),
                 Output(f"{module}.weight_shape", torch.int64, (2,))]
    else:
        found = [Output(name, quantized_dtype(args), tuple(shape))]
    weight_scale_shape = scalar if args.strategy == "tensor" else scale_shape(tuple(shape), args)
    found.append(Output(f"{module}.weight_scale", scale_dtype, weight_scale_shape))
    if recipe.static_inputs:
        found.append(Output(f"{module}.input_scale", scale_dtype, scalar))
    return found + extra


def scale_format(recipe: Recipe) -> tuple:
    """(dtype, shape of a per-tensor scale): compressed-tensors stores [1] in the model's dtype;
    the legacy fp8 layout stores F32 scalars (shape [])."""
    if recipe.format == "fp8":
        return torch.float32, ()
    return DTYPES[recipe.dtype], (1,)


def compute(name: str, tensor: torch.Tensor, is_targeted: bool, recipe: Recipe,
            calibration: dict | None = None, kv: list = ()) -> dict:
    """The tensors of layout(), computed: name -> tensor.

    calibration (builder.quant.calibrate's result) supplies activation and KV-cache maxima and
    GPTQ's integer weights; recipes without calibration pass None.
    Raises BuilderError when the source tensor holds NaN or infinity.
    """
    out_dtype = DTYPES[recipe.dtype]
    scale_dtype, scalar = scale_format(recipe)
    found = {}
    for key, artifact_name in kv:
        amax = calibration["kv_amax"][key]
        found[artifact_name] = scale_from_amax(amax, recipe.kv_cache_scheme, scale_dtype).reshape(scalar)
    if not is_targeted:
        if tensor.is_floating_point():
            require_finite(name, tensor)
        found[name] = tensor.to(out_dtype) if tensor.is_floating_point() else tensor
        return found
    args = recipe.weights
    module = name[: -len(".weight")]
    gptq = (calibration or {}).get("gptq", {}).get(module)
    if gptq is not None:
        values, scale = gptq
        scale = scale.to(scale_dtype)
    else:
        weight = tensor.to(torch.float32)
        amax = grouped_amax(weight, args)
        require_finite(name, amax)  # a NaN or infinity anywhere in the weight reaches its maximum
        scale = scale_from_amax(amax, args, scale_dtype)
        values = quantize_weight(weight, scale.to(torch.float32), args)
    if recipe.packed:
        found[f"{module}.weight_packed"] = pack(values, args.num_bits)
        found[f"{module}.weight_shape"] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)
    else:
        found[name] = values
    found[f"{module}.weight_scale"] = scale.reshape(scalar) if args.strategy == "tensor" else scale
    if recipe.static_inputs:
        amax = calibration["input_amax"][module]
        found[f"{module}.input_scale"] = scale_from_amax(amax, recipe.input_activations, scale_dtype).reshape(scalar)
    return found


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN and infinity: they would quantize to garbage (an amax of inf gives scale inf)."""
    if not bool(torch.isfinite(tensor).all()):
        raise BuilderError(Problem("source weights", name, "holds NaN or infinite values; the checkpoint is "
                                   "corrupt or overflowed when it was saved: fix or replace it"))


def quantized_dtype(args: Args) -> torch.dtype:
    return FP8 if args.type == "float" else torch.int8


def scale_shape(shape: tuple, args: Args) -> tuple:
    rows, columns = shape
    if args.strategy == "tensor":
        return (1,)
    if args.strategy == "channel":
        return (rows, 1)
    return (rows, columns // args.group_size)  # group


def grouped_amax(weight: torch.Tensor, args: Args) -> torch.Tensor:
    """Largest magnitude per scale cell (exact: a max, not a sum), in one pass without temporaries."""
    def max_abs(values, **dims):
        return torch.linalg.vector_norm(values, ord=float("inf"), **dims)

    if args.strategy == "tensor":
        return max_abs(weight).reshape(1)
    if args.strategy == "channel":
        return max_abs(weight, dim=1, keepdim=True)
    rows, columns = weight.shape
    return max_abs(weight.reshape(rows, columns // args.group_size, args.group_size), dim=-1)


def scale_from_amax(amax: torch.Tensor, args: Args, dtype: torch.dtype) -> torch.Tensor:
    """The stored scale, in dtype: amax / ((q_max - q_min) / 2), as compressed-tensors computes it.

    A scale that is zero in dtype (amax 0, or so small that it underflows, e.g. 1e-5 / 448 in FP16)
    becomes dtype's machine epsilon, as compressed-tensors does: guarding before the cast would
    store 0 and turn every weight of the row into NaN or ±448.
    """
    q_min, q_max = args.value_range
    scale = (amax.to(torch.float32) / ((q_max - q_min) / 2)).to(dtype)
    return torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)


def weight_scale(weight: torch.Tensor, args: Args, dtype: torch.dtype) -> torch.Tensor:
    """The weight's stored scales, one per tensor, channel or group."""
    return scale_from_amax(grouped_amax(weight, args), args, dtype)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, args: Args) -> torch.Tensor:
    """round(w / scale) clamped to the type's range, using the scale exactly as stored."""
    if args.strategy == "group":
        scale = scale.repeat_interleave(args.group_size, dim=1)
    q_min, q_max = args.value_range
    scaled = weight / scale  # the one temporary: rounding and clamping happen in place
    if args.type == "float":
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
