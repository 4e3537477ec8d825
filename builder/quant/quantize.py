"""Quantize one tensor at a time with compressed-tensors' arithmetic (symmetric scales), and hand each
format the arithmetic it rounds with (Arithmetic: this one, or a runtime's own from quant/)."""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from builder import formats
from builder.formats import experts
from builder.errors import BuilderError, Problem
from builder.quant import affine, blocks, fp4, kquants, mlxfp, mx
from builder.quant.results import Calibration
from builder.release import families
from builder.release.recipe import Args, Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8 = torch.float8_e4m3fn
# Values worked on at a time (1 MB as FP32): whole rows, so per-row and per-group arithmetic is unchanged;
# temporaries stay in the CPU cache, and none is the size of the tensor (a 400 MB weight used to need
# an FP32 copy and a quotient, 1.6 GB, and ran ~10x slower from main memory).
CHUNK_ELEMENTS = 1 << 18


def targeted(tensor_name: str, shape: tuple, modules: dict, recipe: Recipe) -> bool:
    """Whether a checkpoint tensor is the weight of a module the recipe quantizes; a fused experts
    parameter written one Linear per expert (formats/experts.py, Llama 4) when it quantizes any of them, or
    one the recipe's format quantizes fused as it is (its FUSED: gpt-oss's experts in format mxfp4)."""
    kept = getattr(formats.of(recipe.format), "FUSED", None) if recipe.weights is not None else None
    if kept and len(shape) == 3:
        module, _, leaf = tensor_name.rpartition(".")
        return leaf in kept.get(modules.get(module), ()) and recipe.quantizes(module, modules.get(module))
    if recipe.weights is not None and experts.splittable(tensor_name, tuple(shape), modules):
        return any(recipe.quantizes(module) for module, _ in experts.linears(tensor_name, tuple(shape)))
    if recipe.weights is None or not tensor_name.endswith(".weight") or len(shape) != 2:
        return False
    module = tensor_name[: -len(".weight")]  # calibration's per-expert Linears of split experts: Linears
    return recipe.quantizes(module, modules.get(module) or experts.expert_class(module, modules))


def kv_scales(tensor_name: str, family, recipe: Recipe) -> list:
    """[(calibration key, artifact name)] of the KV-cache scales a checkpoint tensor carries: its layer's
    self_attn.k_scale and/or v_scale (the names compressed-tensors and vLLM load) on the weight of the
    projection that makes them (k_proj, v_proj; or qkv_proj, which makes both, for fused families).
    The format names them in the artifact (its kv_name(): AutoFP8's k_proj.output_scale, for one)."""
    if recipe.kv_cache_scheme is None or not tensor_name.endswith(".weight"):
        return []
    module = tensor_name[: -len(".weight")]
    name = formats.of(recipe.format).kv_name
    for projection, scales in families.kv_sources(family).items():
        if module.endswith("." + projection):
            layer = module[: -len(projection)]
            return [(layer + scale, name(layer + scale, module, len(scales) == 1)) for scale in scales]
    return []


def scale_format(recipe: Recipe) -> tuple:
    """(dtype, shape of a per-tensor scale) the recipe's format stores scales in (its scale_format())."""
    return formats.of(recipe.format).scale_format(recipe)


def unquantized(name: str, tensor: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """A tensor the recipe does not quantize, as every safetensors format writes it: floating
    tensors (checked for NaN and infinity) in the recipe's dtype, others as they are."""
    if not tensor.is_floating_point():
        return tensor
    require_finite(name, tensor)
    return tensor.to(DTYPES[recipe.dtype])


def rounded(name: str, tensor: torch.Tensor, scale_dtype: torch.dtype, recipe: Recipe,
            calibration: Calibration | None = None, fused_amax: Callable | None = None) -> tuple:
    """(values, scale) of a targeted weight with compressed-tensors' arithmetic: FP8 blocks
    (quant/blocks.py), GPTQ's integer weights where calibration has them, else round to nearest with
    the searched scale (observe.searched_scales) or the max |w| one; NVFP4 (quant/fp4.py: E2M1 codes, FP8
    group scales and the global scale, a third item, from fused_amax(name, tensor): max |w| over the
    Linears vLLM fuses with it; GPTQ's codes and scales where calibration has them) and MX (quant/mx.py:
    values or E2M1 codes, E8M0 exponents).
    Raises BuilderError on NaN or infinity.
    """
    args = recipe.weights
    if args.strategy == "tensor_group":
        module = name[: -len(".weight")]
        gptq = calibration.gptq.get(module) if calibration else None
        if gptq is not None:  # (codes, scale, global): GPTQ's, global scales shared as below
            return gptq
        amax = fused_amax(name, tensor) if fused_amax else tensor.abs().amax().to(torch.float32).reshape(1)
        require_finite(name, amax)
        global_scale = fp4.global_scale(amax)
        scale = fp4.group_scales(tensor, global_scale, args.group_size)
        return fp4.quantize_weight(tensor, scale, global_scale, args.group_size), scale, global_scale
    if args.microscaled:
        require_finite(name, tensor)
        exponents = mx.group_exponents(tensor, args.group_size, args.num_bits)
        return mx.quantize_weight(tensor, exponents, args.group_size, args.num_bits), exponents
    if args.strategy == "block":  # rtn with max |w| per block (recipe.block_recipe_problems refuses the rest)
        amax = blocks.block_amax(tensor, args.block_structure)
        require_finite(name, amax)
        scale = scale_from_amax(amax, args, scale_dtype)
        return blocks.quantize_weight(tensor, scale.to(torch.float32), args.block_structure), scale
    module = name[: -len(".weight")]
    gptq = calibration.gptq.get(module) if calibration else None
    if gptq is not None:
        values, scale = gptq
        return values, scale.to(scale_dtype)
    amax = grouped_amax(tensor, args)
    require_finite(name, amax)  # a NaN or infinity anywhere in the weight reaches its maximum
    searched = calibration.weight_scale.get(module) if calibration else None
    scale = scale_from_amax(amax, args, scale_dtype) if searched is None else searched
    return quantize_weight(tensor, scale.to(torch.float32), args), scale


@dataclass(frozen=True)
class Arithmetic:
    """What a format (builder/formats/, a floor below this one) is handed to round and read its tensors.

    weight: the rounding of the part the format names (its QUANTIZER), with that part's signature:
        this module's (name, tensor, scale dtype) -> (values, scale); ggml's (tensor, kind, importance)
        -> blocks; affine's and mlxfp's (tensor, bits, group size, dtype) -> (packed, scales, biases or None)
    scale: (amax, args, dtype) -> the stored scale; finite: (name, tensor) -> None or BuilderError
    decode: the inverse of weight where evaluation needs it (mlx's, every mode), else None
    """

    weight: Callable
    scale: Callable
    finite: Callable
    decode: Callable | None


# Formats that round with a runtime's own arithmetic, by the part their QUANTIZER names: (weight, decode).
# An mlx artifact is read with mlxfp.dequantize whatever its mode (affine groups decode as affine.dequantize).
RUNTIME_ARITHMETIC = {"quantize.ggml": (kquants.blocks, None), "quantize.affine": (affine.quantize, mlxfp.dequantize),
                      "quantize.mlxfp": (mlxfp.quantize, mlxfp.dequantize)}


def arithmetic(recipe: Recipe, calibration: Calibration | None = None, tensors: dict | None = None) -> Arithmetic:
    """The arithmetic the recipe's format rounds with; compressed-tensors' uses calibration's GPTQ
    weights and searched scales, and NVFP4's the source tensor index (tensors) to share global scales
    between the Linears vLLM fuses."""
    part = formats.quantizer(recipe)
    if part is not None:
        return runtime_arithmetic(part)
    shared = fused_maxima(tensors) if tensors is not None and recipe.weights is not None \
        and recipe.weights.strategy == "tensor_group" else None
    return Arithmetic(partial(rounded, recipe=recipe, calibration=calibration, fused_amax=shared),
                      scale_from_amax, require_finite, None)


# The Linears vLLM fuses into one, found by name under one parent whatever the parent is called, so a family
# without a row shares as one with a row does: an MLP's gate and up (gate_up_proj; an expert's, a shared
# expert's, Llama 4's `feed_forward.`), attention's q/k/v (qkv_proj), MLA's query and latent-KV down
# projections (DeepSeek-V3's fused_qkv_a_proj, made when the query is low-rank), and an expert's w1/w3 (w13).
GATE_UP = ("gate_proj", "up_proj")
QKV = ("q_proj", "k_proj", "v_proj")
MLA = ("q_a_proj", "kv_a_proj_with_mqa")
EXPERT_GATE_UP = ("w1", "w3")


def fused(module: str) -> tuple:
    """The modules vLLM fuses module with into one Linear (q/k/v, MLA's q_a/kv_a, gate/up, an expert's
    w1/w3), by name (above); the siblings a model lacks are left out by the callers; (module,) when it
    fuses none. Names decide alone: Phi-3's qkv_proj and gate_up_proj are one Linear on disk already."""
    stem, _, leaf = module.rpartition(".")
    expert = stem.rpartition(".")[2].isdigit()
    for group in (QKV, MLA, GATE_UP, *((EXPERT_GATE_UP,) if expert else ())):
        if leaf in group:
            return tuple(f"{stem}.{other}" for other in group)
    return (module,)


def fused_maxima(tensors: dict) -> Callable:
    """(name, tensor) -> max |w| over the weights fused with it (FP32 [1]): the fused siblings present in
    tensors, or sliced from the fused experts parameter that holds them (formats/experts.py: Llama 4's,
    read once for all its experts), are read (max only) when the first of them is quantized, and remembered."""
    from builder.tensorfile import reader

    found, kept = {}, {}

    def held(name: str):
        if name not in kept:  # the fused parameter of the experts in hand; the previous one is dropped
            kept.clear()
            with reader({name: tensors[name]}) as read:
                kept[name] = read(name)
        return kept[name]

    def amax(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in found:
            names = [sibling + ".weight" for sibling in fused(name[: -len(".weight")])]
            names = [other for other in names if other == name or other in tensors or experts.holder(other, tensors)]
            maxima = []
            with reader({other: tensors[other] for other in names if other != name and other in tensors}) as read:
                for other in names:
                    weight = tensor if other == name else read(other) if other in tensors else \
                        experts.expert_weight(other, held, tensors)
                    maxima.append(weight.abs().amax().to(torch.float32).reshape(1))
            shared = torch.stack(maxima).amax(dim=0)
            found.update({other: shared for other in names})
        if experts.holder(name, tensors) is None:
            kept.clear()
        return found.pop(name)

    return amax


def runtime_arithmetic(part: str | None) -> Arithmetic:
    """The arithmetic of a runtime's part (a format's QUANTIZER), without a recipe: what evaluation
    hands a format's load() (compressed-tensors' own loader decodes its formats)."""
    weight, decode = RUNTIME_ARITHMETIC.get(part, (None, None))
    return Arithmetic(weight, scale_from_amax, require_finite, decode)


def smoothed(name: str, tensor: torch.Tensor, calibration: Calibration | None) -> torch.Tensor:
    """The source tensor with SmoothQuant's or AWQ's factor applied (builder/quant/scaling.py), in FP32: a norm's weight
    divided by it, a Linear's weight columns multiplied by it; other tensors as they are."""
    factor = calibration.smoothing.get(name) if calibration else None
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
    NVFP4's (tensor_group) is its FP32 global scale, 448 * 6 / amax, whatever dtype (quant/fp4.py).
    """
    if args.strategy == "tensor_group":
        return fp4.global_scale(amax)
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
