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

from builder import failpoints, tensorfile
from builder.artifact import export, shards
from builder.canonical import pretty_json
from builder.console import progress
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
    """Weights, config.json and tokenizer files into staging; returns the weight file names."""
    recipe, tensors, modules = source["recipe"], source["tensors"], source["modules"]
    tied = source["config"].get("tie_word_embeddings")
    names = [name for name in sorted(tensors) if not (tied and name == "lm_head.weight")]
    targeted = {name: quantize.targeted(name, tensors[name][2], modules, recipe) for name in names}
    groups = [layout(name, tensors[name][2], tensors[name][1], targeted[name], recipe) for name in names]
    source_of = {output.name: name for name, group in zip(names, groups) for output in group}
    assigned = shards.assign(groups, spec["target"]["max_shard_bytes"])
    files = shards.shard_names(len(assigned))
    count = sum(len(outputs) for outputs in assigned)
    with tensorfile.reader(tensors) as read, progress(total=count, desc="quantize", unit="tensor") as bar:
        produce, done = producer(read, source_of, targeted, recipe, tensors), []

        def produce_and_count(name):
            bar.update()
            done.append(name)
            if len(done) == count // 2:
                failpoints.reached("quantize")
            return produce(name)

        for outputs, file in zip(assigned, files):
            tensorfile.write(staging / file, outputs, produce_and_count)
    if len(files) > 1:
        (staging / WEIGHT_FILES[1]).write_text(pretty_json(shards.index(assigned, files)), encoding="utf-8")
        files.append(WEIGHT_FILES[1])
    (staging / "config.json").write_text(pretty_json(mlx_config(source["config"], recipe)), encoding="utf-8")
    export.copy_side_files(source["path"], staging)
    return files


def producer(read, source_of: dict, targeted: dict, recipe, tensors: dict):
    """produce(output name) -> its tensor. A shard lays tensors out by dtype, so a weight's uint32
    codes and its scales are asked for at different times: the scales and biases (small) wait for
    their turn; a large output asked for later is computed again, so memory stays at one tensor."""
    waiting, written = {}, set()

    def produce(output_name: str):
        if output_name not in waiting:
            name = source_of[output_name]
            tensor = read(name)
            computed = compute(name, tensor, targeted[name], recipe)
            waiting.update({key: value for key, value in computed.items() if key == output_name or (
                key not in written and value.nbytes * export.KEEP_FRACTION <= tensor.nbytes)})
        written.add(output_name)
        return waiting.pop(output_name)

    return produce


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
