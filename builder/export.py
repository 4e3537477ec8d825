"""Write an artifact's files: weights as streamed shards, config.json, tokenizer and release files."""

import shutil
from pathlib import Path

from tqdm import tqdm

from builder import failpoints, quantize, shards
from builder.canonical import pretty_json
from builder.load import WEIGHT_FILES

# Keys transformers stamps with local facts (paths); dropped so the artifact does not depend on them.
UNSTABLE_CONFIG_KEYS = ("_name_or_path",)


def plan_outputs(tensors: dict, modules: dict, quant: dict) -> list:
    """One list of Outputs per source tensor (sorted by name), without computing anything."""
    from builder.load import torch_dtype

    groups = []
    for name in sorted(tensors):
        _, code, shape = tensors[name]
        is_targeted = quantize.targeted(name, shape, modules, quant)
        groups.append(quantize.layout(name, torch_dtype(code), shape, is_targeted, quant))
    return groups


def write_weights(out: Path, tensors: dict, modules: dict, quant: dict, max_shard_bytes: int) -> list:
    """Quantize and write every tensor, one at a time; returns the weight file names written."""
    from safetensors import safe_open

    groups = plan_outputs(tensors, modules, quant)
    source_of = {o.name: group[0].name for group in groups for o in group}
    handles, last = {}, {}

    def produce(output_name: str):
        source = source_of[output_name]
        if source not in last:  # one source tensor's outputs are kept until the next is asked for
            file, _, shape = tensors[source]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt")
            tensor = handles[file].get_tensor(source)
            last.clear()
            last[source] = quantize.compute(source, tensor, quantize.targeted(source, shape, modules, quant), quant)
        return last[source][output_name]

    assigned = shards.assign(groups, max_shard_bytes)
    names = shards.shard_names(len(assigned))
    count = sum(len(outputs) for outputs in assigned)
    written = 0
    with tqdm(total=count, desc="quantize", unit="tensor", disable=None, leave=False) as bar:
        def produce_and_count(name):
            nonlocal written
            written += 1
            bar.update()
            if written == count // 2:
                failpoints.reached("quantize")
            return produce(name)

        for outputs, file_name in zip(assigned, names):
            shards.write(out / file_name, outputs, produce_and_count)
            failpoints.reached("shard")
    if len(names) > 1:
        (out / WEIGHT_FILES[1]).write_text(pretty_json(shards.index(assigned, names)), encoding="utf-8")
        names.append(WEIGHT_FILES[1])
    return names


def quantization_config(quant: dict) -> dict:
    """config.json's quantization_config exactly as compressed-tensors writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(values):
        return None if values is None else QuantizationArgs(**values)

    scheme = QuantizationScheme(targets=list(quant["targets"]), weights=args(quant["weights"]),
                                input_activations=args(quant["input_activations"]))
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=quantize.compression_format(quant),
                                quantization_status="compressed", ignore=list(quant["ignore"]))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}


def write_config(source: dict, out: Path, quant: dict) -> None:
    """The source config.json, normalised, with the output dtype and quantization_config."""
    config = {k: v for k, v in source.items() if k not in UNSTABLE_CONFIG_KEYS}
    config["dtype"] = quant["dtype"]
    config.pop("torch_dtype", None)
    if quant["format"] != "dense":
        config["quantization_config"] = quantization_config(quant)
    (out / "config.json").write_text(pretty_json(config), encoding="utf-8")


def copy_side_files(source: Path, out: Path) -> list:
    """Tokenizer, generation config and other non-weight files, copied byte for byte."""
    copied = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        if relative.name in ("config.json", *WEIGHT_FILES) or path.suffix == ".safetensors":
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / relative)
        copied.append(relative.as_posix())
    return copied
