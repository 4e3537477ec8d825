"""Format mlx: mlx-lm's layout. Safetensors shards with each quantized Linear as packed uint32 `weight`,
`scales` and `biases` (MLX's affine groups), config.json with mlx-lm's `quantization` block. Written
by the builder's own safetensors path: mlx is not a dependency of the builder.

    builder build smollm2-135m-instruct-mlx-4bit && mlx_lm.generate --model artifacts/smollm2-135m-instruct-mlx-4bit

mlx-lm quantizes a module when the weights hold its `scales` (bits and group size follow from the
shapes); everything else is read as it is stored, in the recipe's dtype.
"""

from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.formats import checks, dense
from builder.tensorfile import Output, index_of, reader

VERSION = 1            # mlx-lm's layout: tensor names, uint32 packing, config.json's quantization
PACKAGES = ()
QUANTIZER = "quantize.affine"
# transformers model_type -> mlx-lm's model module (it maps mistral to llama)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
CONTAINER = ".safetensors"
LIBRARY = "mlx"
VLLM = "mlx"
SCALES = ("scales", "biases")
BITS, GROUP_SIZES = (4, 8), (32, 64, 128)  # mlx-lm's affine modes this builder writes
MODE = "affine"
WORD_BITS = 32


def problems(recipe, rules) -> list:
    """mlx-lm's affine groups (a scale and a bias per group: asymmetric), round to nearest."""
    if recipe.weights is None:
        return checks.unquantized(recipe)

    def fits(args):
        return args.type == "int" and args.strategy == "group" and not args.symmetric and \
            args.num_bits in BITS and args.group_size in GROUP_SIZES
    return checks.runtime_types(recipe, "mlx-lm's affine groups: type int, strategy group, symmetric false, "
                                f"num_bits {' or '.join(map(str, BITS))}, group_size "
                                f"{', '.join(map(str, GROUP_SIZES))}", fits, ("rtn",))


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization", {}).get("mode") == MODE


def load(folder: Path, config: dict, decode):
    """An mlx-lm checkpoint as a transformers model in FP32: each quantized Linear's weight is
    decode(weight, scales, biases, bits) = scale * q + bias (exact in FP32), every other tensor cast;
    read one tensor at a time."""
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
                value = decode(read(name), read(f"{module}.scales"), read(f"{module}.biases"), bits)
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
    """The tensors one source tensor becomes (weight, scales, biases for a quantized Linear); none for
    a tied lm_head (mlx-lm's llama and qwen2 read embed_tokens.as_linear)."""
    import torch

    if tied and name == "lm_head.weight":
        return []
    if not targeted:
        return [dense.stored(name, dtype, shape, recipe)]
    rows, columns = shape
    args, module, stored = recipe.weights, name[: -len(".weight")], getattr(torch, recipe.dtype)
    groups = (rows, columns // args.group_size)
    return [Output(name, torch.uint32, (rows, columns * args.num_bits // WORD_BITS)),
            Output(f"{module}.scales", stored, groups), Output(f"{module}.biases", stored, groups)]


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return {}  # every output needs the source's values


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    """A targeted weight's packed codes, scales and biases (arithmetic.weight: MLX's affine quantize)."""
    import torch

    arithmetic.finite(name, tensor)
    dtype, module = getattr(torch, recipe.dtype), name[: -len(".weight")]
    packed, scales, biases = arithmetic.weight(tensor.to(dtype), recipe.weights.num_bits,
                                               recipe.weights.group_size, dtype)
    return {name: packed, f"{module}.scales": scales, f"{module}.biases": biases}


def config(source: dict, recipe, routers: list = ()) -> dict:
    """The source config.json, normalised, with mlx-lm's quantization block (also as
    quantization_config, as mlx-lm writes it) and a top-level rope_theta: mlx-lm reads that, not
    transformers 5's rope_parameters, and would otherwise run RoPE with its default base."""
    config = dense.normalised(source, recipe)
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
    if recipe.weights is not None:
        block = {"group_size": recipe.weights.group_size, "bits": recipe.weights.num_bits, "mode": MODE}
        config["quantization"], config["quantization_config"] = block, dict(block)
    return config
