"""Quantize one tensor at a time with compressed-tensors' arithmetic (symmetric scales)."""

import torch

from builder.errors import BuilderError, Problem
from builder.release import families
from builder.release.recipe import Args, Recipe
from builder.tensorfile import Output

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8 = torch.float8_e4m3fn
PACK_BITS = 32  # sub-8-bit weights are packed into int32 words (compressed-tensors pack-quantized)
# Values worked on at a time (1 MB as FP32): whole rows, so per-row and per-group arithmetic is unchanged;
# temporaries stay in the CPU cache, and none is the size of the tensor (a 400 MB weight used to need
# an FP32 copy and a quotient, 1.6 GB, and ran ~10x slower from main memory).
CHUNK_ELEMENTS = 1 << 18
PACK_ELEMENTS = 1 << 16  # values packed at a time: its byte-sized temporaries stay below glibc's mmap threshold


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


def known(name: str, shape: tuple, is_targeted: bool, recipe: Recipe, calibration: dict | None = None,
          kv: list = ()) -> dict:
    """The tensors of layout() that need no source values, computed: a KV-cache projection's scale and
    a weight's input scale (from calibration), a packed weight's `weight_shape`. Written before any
    tensor is read: the I64 `weight_shape`s lead the file, so its hash need not wait for the last one."""
    scale_dtype, scalar = scale_format(recipe)
    found = {}
    for key, artifact_name in kv:
        amax = calibration["kv_amax"][key]
        found[artifact_name] = scale_from_amax(amax, recipe.kv_cache_scheme, scale_dtype).reshape(scalar)
    if not is_targeted:
        return found
    module = name[: -len(".weight")]
    if recipe.packed:
        found[f"{module}.weight_shape"] = torch.tensor(tuple(shape), dtype=torch.int64)
    if recipe.static_inputs:
        amax = calibration["input_amax"][module]
        found[f"{module}.input_scale"] = scale_from_amax(amax, recipe.input_activations, scale_dtype).reshape(scalar)
    return found


def compute(name: str, tensor: torch.Tensor, is_targeted: bool, recipe: Recipe,
            calibration: dict | None = None) -> dict:
    """The other tensors of layout() (not known()), computed from the source tensor: name -> tensor.

    calibration (builder.quant.calibrate's result) supplies GPTQ's integer weights and searched weight
    scales (observe.searched_scales); recipes without either pass None. Raises BuilderError when the
    source tensor holds NaN or infinity.
    """
    tensor = smoothed(name, tensor, calibration)
    if not is_targeted:
        if tensor.is_floating_point():
            require_finite(name, tensor)
        return {name: tensor.to(DTYPES[recipe.dtype]) if tensor.is_floating_point() else tensor}
    scale_dtype, scalar = scale_format(recipe)
    args = recipe.weights
    module = name[: -len(".weight")]
    gptq = (calibration or {}).get("gptq", {}).get(module)
    if gptq is not None:
        values, scale = gptq
        scale = scale.to(scale_dtype)
    else:
        amax = grouped_amax(tensor, args)
        require_finite(name, amax)  # a NaN or infinity anywhere in the weight reaches its maximum
        searched = (calibration or {}).get("weight_scale", {}).get(module)
        scale = scale_from_amax(amax, args, scale_dtype) if searched is None else searched
        values = quantize_weight(tensor, scale.to(torch.float32), args)
    found = {f"{module}.weight_packed": pack(values, args.num_bits)} if recipe.packed else {name: values}
    found[f"{module}.weight_scale"] = scale.reshape(scalar) if args.strategy == "tensor" else scale
    return found


def smoothed(name: str, tensor: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """The source tensor with SmoothQuant's or AWQ's factor applied (builder/quant/scaling.py), in FP32: a norm's weight
    divided by it, a Linear's weight columns multiplied by it; other tensors as they are."""
    factor = (calibration or {}).get("smoothing", {}).get(name)
    if factor is None:
        return tensor
    tensor = tensor.to(torch.float32)
    return tensor / factor if tensor.dim() == 1 else tensor * factor


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN and infinity: they would quantize to garbage (an amax of inf gives scale inf).

    Checked on the smallest and largest value (one pass, no temporary): a NaN anywhere reaches both.
    """
    if tensor.numel() and not all(bool(torch.isfinite(end)) for end in torch.aminmax(tensor)):
        raise BuilderError(Problem("source weights", name, "holds NaN or infinite values; the checkpoint is "
                                   "corrupt or overflowed when it was saved: fix or replace it"))


def block_rows(columns: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per block: whole rows holding at most `elements` values, at least one."""
    return max(1, elements // max(1, columns))


def row_blocks(rows: int, columns: int, elements: int = CHUNK_ELEMENTS) -> list:
    """Slices of whole rows holding at most `elements` values (at least one row) each."""
    step = block_rows(columns, elements)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def cell_size(columns: int, args: Args) -> int:
    """Values sharing one scale within a row: a group, or the whole row (channel and tensor)."""
    return args.group_size if args.strategy == "group" else columns


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
    """Largest magnitude per scale cell, FP32 (exact: a max, not a sum), in row blocks of any float dtype."""
    rows, columns = weight.shape
    size = cell_size(columns, args)
    magnitudes = torch.empty(min(rows, block_rows(columns)) * columns, dtype=weight.dtype)  # reused per block
    maxima = []
    for block in row_blocks(rows, columns):
        cells = weight[block].reshape(block.stop - block.start, columns // size, size)
        maxima.append(torch.abs(cells, out=magnitudes[: cells.numel()].view(cells.shape)).amax(dim=-1))
    amax = torch.cat(maxima).to(torch.float32)
    return amax.amax().reshape(1) if args.strategy == "tensor" else amax  # [1], [rows, 1] or [rows, groups]


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
    """round(w / scale) clamped to the type's range, using the scale exactly as stored (FP32).

    Row blocks at a time through one FP32 buffer: each value meets the same division, rounding and
    clamp as a whole-tensor computation, so the bytes are those of `(w.float() / s).round().clamp()`.
    """
    rows, columns = weight.shape
    size = cell_size(columns, args)
    q_min, q_max = args.value_range
    values = torch.empty((rows, columns), dtype=quantized_dtype(args))
    work = torch.empty(min(rows, block_rows(columns)) * columns, dtype=torch.float32)
    for block in row_blocks(rows, columns):
        count = block.stop - block.start
        cells = work[: count * columns].view(count, columns // size, size)
        divisor = scale.reshape(1, 1, 1) if args.strategy == "tensor" else scale[block].unsqueeze(-1)
        cells.copy_(weight[block].reshape(cells.shape)).div_(divisor)  # in the buffer: no cast temporary
        if args.type == "int":
            cells.round_()
        values[block].copy_(cells.clamp_(q_min, q_max).view(count, columns))  # the cast: .to(FP8 or int8)
    return values


def pack(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Signed num_bits integers (int8 tensor [rows, columns]) packed into int32 words along columns.

    Each value is offset to unsigned (+2^(num_bits-1)); value j of a word sits at bits
    num_bits*j (little end first); the last word is zero-padded. compressed-tensors' pack-quantized.
    Built a byte at a time (num_bits divides 8: the schema allows 4 and 8): the bytes of a word,
    little-endian as safetensors stores them, are its value.
    """
    per_byte, per_word = 8 // num_bits, PACK_BITS // num_bits
    mask, half = (1 << num_bits) - 1, 1 << (num_bits - 1)
    rows, columns = values.shape
    words = torch.empty((rows, -(-columns // per_word)), dtype=torch.int32)
    for block in row_blocks(rows, columns, PACK_ELEMENTS):
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
