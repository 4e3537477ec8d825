"""Format mlx: mlx-lm's layout. Safetensors shards with each quantized Linear as packed uint32 `weight`,
`scales` and, in mode affine, `biases`; config.json with mlx-lm's `quantization` block. Written by the
builder's own safetensors path: mlx is not a dependency of the builder.

    builder build smollm2-135m-instruct-mlx-4bit && mlx_lm.generate --model artifacts/smollm2-135m-instruct-mlx-4bit

Modes (mlx-lm's --q-mode), said by the recipe's weight arguments (MODES): affine (integer codes, a scale
and a bias per group in the recipe's dtype: quantize.affine) and the float modes mxfp4, nvfp4, mxfp8
(uint8 scales, no biases: quantize.mlxfp). mlx-lm quantizes a module when the weights hold its `scales`
and tells the mode from them (scales' dtype, bits and group size from the shapes); everything else is
read as it is stored, in the recipe's dtype.
"""

from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.formats import checks, dense
from builder.tensorfile import Output, index_of, reader

VERSION = 1            # mlx-lm's layout: tensor names, uint32 packing, config.json's quantization
PACKAGES = ()
QUANTIZER = "quantize.affine"  # mode affine's; the float modes round with quantize.mlxfp (quantizer(recipe))
# transformers model_type -> mlx-lm's model module (it maps mistral to llama)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
UNSCALED_ROPE_ONLY = True  # resolve refuses scaled RoPE (families.layout_problems)
CONTAINER = ".safetensors"
LIBRARY = "mlx"
VLLM = "mlx"
SCALES = ("scales", "biases")
BITS, GROUP_SIZES = (4, 8), (32, 64, 128)  # mlx-lm's affine modes this builder writes
MODE = "affine"
# mx.quantize's float modes: exactly these arguments each (mlx refuses other bits or group sizes)
FLOAT = dict(type="float", strategy="group", symmetric=True)
MODES = {"mxfp4": dict(FLOAT, num_bits=4, group_size=32, scale_dtype="uint8"),             # E2M1, E8M0 scales
         "nvfp4": dict(FLOAT, num_bits=4, group_size=16, scale_dtype="float8_e4m3fn"),     # E2M1, E4M3 scales
         "mxfp8": dict(FLOAT, num_bits=8, group_size=32, scale_dtype="uint8")}             # E4M3, E8M0 scales
QUANTIZERS = {MODE: QUANTIZER, **{name: "quantize.mlxfp" for name in MODES}}
WORD_BITS = 32


def mode(args) -> str | None:
    """The mlx mode weight arguments are (affine, mxfp4, nvfp4, mxfp8), or None."""
    if args.type == "int" and args.strategy == "group" and not args.symmetric and args.num_bits in BITS \
            and args.group_size in GROUP_SIZES and args.scale_dtype is None:
        return MODE
    return next((name for name, wanted in MODES.items()
                 if all(getattr(args, key) == value for key, value in wanted.items())), None)


def quantizer(recipe) -> str | None:
    """The part that rounds the recipe's weights: the mode's (None when it quantizes nothing)."""
    return None if recipe.weights is None else QUANTIZERS.get(mode(recipe.weights), QUANTIZER)


def problems(recipe, rules) -> list:
    """mlx-lm's modes: affine groups (a scale and a bias per group: asymmetric) or mx.quantize's float
    modes with exactly their arguments; round to nearest."""
    if recipe.weights is None:
        return checks.unquantized(recipe)
    floats = "; ".join(f"{name}: num_bits {args['num_bits']}, group_size {args['group_size']}, scale_dtype "
                       f"{args['scale_dtype']}" for name, args in MODES.items())
    return checks.runtime_types(recipe, "mlx-lm's affine groups: type int, strategy group, symmetric false, "
                                f"num_bits {' or '.join(map(str, BITS))}, group_size "
                                f"{', '.join(map(str, GROUP_SIZES))}; or its float modes, type float, strategy "
                                f"group, symmetric true, exactly ({floats})", lambda args: mode(args) is not None,
                                ("rtn",))


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization", {}).get("mode") in QUANTIZERS


def load(folder: Path, config: dict, decode):
    """An mlx-lm checkpoint as a transformers model in FP32: each quantized Linear's weight is
    decode(weight, scales, biases or None, bits) (affine: scale * q + bias; float modes: the value of the
    code times the group's scale; exact in FP32), every other tensor cast; read one tensor at a time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    for key in ("quantization", "quantization_config"):  # mlx-lm's, not a transformers quantizer's
        if hasattr(model_config, key):
            delattr(model_config, key)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    parameters = dict(model.named_parameters())
    tensors = index_of(sorted(folder.glob("*.safetensors")))
    bits = config["quantization"]["bits"]
    with reader(tensors) as read, torch.no_grad():
        for name in sorted(n for n in tensors if not n.endswith((".scales", ".biases"))):
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and f"{module}.scales" in tensors:
                biases = read(f"{module}.biases") if f"{module}.biases" in tensors else None
                value = decode(read(name), read(f"{module}.scales"), biases, bits)
            else:
                value = read(name)
            parameters.pop(name).copy_(value)
    model.tie_weights()
    if parameters.keys() - {"lm_head.weight"}:  # an untied lm_head must have been in the files
        raise BuilderError(Problem(folder.name, sorted(parameters)[0], "missing from the MLX weights"))
    return model


def prepare(path: Path, config: dict, spec: dict) -> dict:
    return dense.prepare(path, config, spec)


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    """The tensors one source tensor becomes (weight, scales and, affine, biases for a quantized Linear;
    the float modes' scales are uint8); none for a tied lm_head (mlx-lm's llama and qwen2 read
    embed_tokens.as_linear)."""
    import torch

    if tied and name == "lm_head.weight":
        return []
    if not targeted:
        return [dense.stored(name, dtype, shape, recipe)]
    rows, columns = shape
    args, module, stored = recipe.weights, name[: -len(".weight")], getattr(torch, recipe.dtype)
    groups = (rows, columns // args.group_size)
    packed = Output(name, torch.uint32, (rows, columns * args.num_bits // WORD_BITS))
    if mode(args) != MODE:
        return [packed, Output(f"{module}.scales", torch.uint8, groups)]
    return [packed, Output(f"{module}.scales", stored, groups), Output(f"{module}.biases", stored, groups)]


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return {}  # every output needs the source's values


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    """A targeted weight's packed codes, scales and (affine) biases (arithmetic.weight: mx.quantize in the
    recipe's mode, in the recipe's dtype)."""
    import torch

    arithmetic.finite(name, tensor)
    dtype, module = getattr(torch, recipe.dtype), name[: -len(".weight")]
    packed, scales, biases = arithmetic.weight(tensor.to(dtype), recipe.weights.num_bits,
                                               recipe.weights.group_size, dtype)
    found = {name: packed, f"{module}.scales": scales}
    return found if biases is None else {**found, f"{module}.biases": biases}


def config(source: dict, recipe, routers: list = ()) -> dict:
    """The source config.json, normalised, with mlx-lm's quantization block (also as
    quantization_config, as mlx-lm writes it) and a top-level rope_theta: mlx-lm reads that, not
    transformers 5's rope_parameters, and would otherwise run RoPE with its default base."""
    config = dense.normalised(source, recipe)
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
    if recipe.weights is not None:
        block = {"group_size": recipe.weights.group_size, "bits": recipe.weights.num_bits, "mode": mode(recipe.weights)}
        config["quantization"], config["quantization_config"] = block, dict(block)
    return config
