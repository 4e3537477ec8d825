"""Write a release in mlx-lm's layout (quant.format mlx): safetensors shards with each quantized Linear
as packed uint32 `weight`, `scales` and `biases` (MLX's affine groups), config.json with mlx-lm's
`quantization` block, and the tokenizer files. Written with the builder's own safetensors writer: mlx
is not a dependency of the builder.

    builder build smollm2-135m-instruct-mlx-4bit && mlx_lm.generate --model artifacts/smollm2-135m-instruct-mlx-4bit

mlx-lm quantizes a module when the weights hold its `scales` (bits and group size follow from the
shapes); everything else is read as it is stored, in the recipe's dtype.
"""

from pathlib import Path

import torch

from builder import tensorfile
from builder.artifact import export, shards, stream
from builder.canonical import file_entry, pretty_json
from builder.quant import affine, quantize
from builder.source.load import WEIGHT_FILES
from builder.tensorfile import Output

DTYPES = quantize.DTYPES
MODE = "affine"


def prepare(path: Path, config: dict, spec: dict) -> dict:
    """Nothing to read besides the tensors: config.json and the tokenizer files are copied."""
    return {}


def layout(name: str, shape: tuple, code: str, is_targeted: bool, recipe) -> list:
    """The tensors one source tensor becomes (weight, scales, biases for a quantized Linear)."""
    dtype = DTYPES[recipe.dtype]
    if not is_targeted:
        source_dtype = tensorfile.torch_dtype(code)
        return [Output(name, dtype if source_dtype.is_floating_point else source_dtype, tuple(shape))]
    rows, columns = shape
    args, module = recipe.weights, name[: -len(".weight")]
    groups = (rows, columns // args.group_size)
    return [Output(name, torch.uint32, (rows, columns * args.num_bits // affine.WORD_BITS)),
            Output(f"{module}.scales", dtype, groups), Output(f"{module}.biases", dtype, groups)]


def compute(name: str, tensor: torch.Tensor, is_targeted: bool, recipe) -> dict:
    """layout()'s tensors, computed."""
    quantize.require_finite(name, tensor)
    dtype = DTYPES[recipe.dtype]
    if not is_targeted:
        return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor}
    module = name[: -len(".weight")]
    packed, scales, biases = affine.quantize(tensor.to(dtype), recipe.weights.num_bits, recipe.weights.group_size, dtype)
    return {name: packed, f"{module}.scales": scales, f"{module}.biases": biases}


def write(staging: Path, spec: dict, source: dict, calibration: dict | None) -> list:
    """Weights, config.json and tokenizer files into staging, the weights through the builder's stream
    (each source read and quantized once, each shard hashed as it fills); returns the weight files'
    entries ({path, sha256, size})."""
    recipe, tensors, modules = source["recipe"], source["tensors"], source["modules"]
    tied = source["config"].get("tie_word_embeddings")
    names = [name for name in sorted(tensors) if not (tied and name == "lm_head.weight")]
    targeted = {name: quantize.targeted(name, tensors[name][2], modules, recipe) for name in names}
    groups = [layout(name, tensors[name][2], tensors[name][1], targeted[name], recipe) for name in names]
    assigned = shards.assign(groups, spec["target"]["max_shard_bytes"])
    files = shards.shard_names(len(assigned))
    sources = [(name, tensorfile.nbytes(tensorfile.torch_dtype(tensors[name][1]), tensors[name][2])) for name in names]
    with tensorfile.reader(tensors) as read:
        entries = stream.write_shards(staging, sources, groups, assigned, files, read,
                                      lambda name, tensor: compute(name, tensor, targeted[name], recipe),
                                      lambda name: {})  # every output needs the source's values
    if len(files) > 1:
        (staging / WEIGHT_FILES[1]).write_text(pretty_json(shards.index(assigned, files)), encoding="utf-8")
        entries.append(file_entry(staging, WEIGHT_FILES[1]))
    (staging / "config.json").write_text(pretty_json(mlx_config(source["config"], recipe)), encoding="utf-8")
    export.copy_side_files(source["path"], staging)
    return entries


def mlx_config(source: dict, recipe) -> dict:
    """The source config.json, normalised, with mlx-lm's quantization block (also as
    quantization_config, as mlx-lm writes it) and a top-level rope_theta: mlx-lm reads that, not
    transformers 5's rope_parameters, and would otherwise run RoPE with its default base."""
    config = {key: value for key, value in source.items() if key not in export.UNSTABLE_CONFIG_KEYS}
    config.pop("torch_dtype", None)
    config["dtype"] = recipe.dtype
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
    if recipe.weights is not None:
        block = {"group_size": recipe.weights.group_size, "bits": recipe.weights.num_bits, "mode": MODE}
        config["quantization"], config["quantization_config"] = block, dict(block)
    return config
