"""Write an artifact's files: weights as streamed shards, config.json, tokenizer and release files."""

import shutil
from pathlib import Path

from builder import tensorfile
from builder.artifact import shards, stream
from builder.canonical import file_entry, pretty_json
from builder.errors import BuilderError, Problem
from builder.quant import quantize
from builder.source.load import WEIGHT_FILES
from builder.release.recipe import Args, Recipe

# Keys transformers stamps with local facts (paths); dropped so the artifact does not depend on them.
UNSTABLE_CONFIG_KEYS = ("_name_or_path",)
# QuantizationArgs fields a recipe does not set, with the values compressed-tensors 0.17 writes for them.
QUANTIZATION_ARGS_DEFAULTS = {"actorder": None, "block_structure": None, "observer_kwargs": {},
                              "scale_dtype": None, "zp_dtype": None}


def plan_outputs(tensors: dict, modules: dict, family, recipe: Recipe) -> list:
    """One list of Outputs per source tensor (sorted by name), without computing anything.

    Raises BuilderError when the recipe quantizes the KV cache and a decoder layer would get no k or
    v scale (an architecture whose projections the family table does not name)."""
    groups, kv_written = [], set()
    for name in sorted(tensors):
        _, code, shape = tensors[name]
        is_targeted = quantize.targeted(name, shape, modules, recipe)
        kv = quantize.kv_scales(name, family, recipe)
        kv_written.update(key for key, _ in kv)
        groups.append(quantize.layout(name, tensorfile.torch_dtype(code), shape, is_targeted, recipe, kv))
    if recipe.kv_cache_scheme is not None:
        expected = {f"{name}.{scale}" for name in modules if name.endswith(".self_attn")
                    for scale in ("k_scale", "v_scale")}
        missing = sorted(expected - kv_written)
        if missing:
            raise BuilderError(Problem("quant", "kv_cache_scheme", f"no projection makes {', '.join(missing[:4])}"
                                       f"{' ...' if len(missing) > 4 else ''}: the family table names none"))
    return groups


def write_weights(out: Path, tensors: dict, modules: dict, family, recipe: Recipe, max_shard_bytes: int,
                  calibration: dict | None = None) -> list:
    """Quantize and write every tensor: each source read and quantized once, each output written at
    its planned offset, each file hashed once as it fills (builder.artifact.stream).

    calibration: builder.quant.calibrate's statistics and GPTQ weights, for recipes that calibrate.
    Returns the weight files' entries ({path, sha256, size}), for the manifest and provenance.
    """
    groups = plan_outputs(tensors, modules, family, recipe)
    assigned = shards.assign(groups, max_shard_bytes)
    names = shards.shard_names(len(assigned))
    sources = [(name, tensorfile.nbytes(tensorfile.torch_dtype(tensors[name][1]), tensors[name][2]))
               for name in sorted(tensors)]

    def compute(name, tensor):
        is_targeted = quantize.targeted(name, tensors[name][2], modules, recipe)
        return quantize.compute(name, tensor, is_targeted, recipe, calibration)

    def known(name):
        is_targeted = quantize.targeted(name, tensors[name][2], modules, recipe)
        return quantize.known(name, tensors[name][2], is_targeted, recipe, calibration,
                             quantize.kv_scales(name, family, recipe))

    with tensorfile.reader(tensors) as read:
        entries = stream.write_shards(out, sources, groups, assigned, names, read, compute, known)
    if len(names) > 1:
        (out / WEIGHT_FILES[1]).write_text(pretty_json(shards.index(assigned, names)), encoding="utf-8")
        entries.append(file_entry(out, WEIGHT_FILES[1]))
    return entries


def quantization_config(recipe: Recipe, routers: list = ()) -> dict:
    """config.json's quantization_config exactly as compressed-tensors (or, for format fp8, AutoFP8) writes it.

    Written as data rather than through compressed-tensors' pydantic models, whose import costs a
    build ~2 s and ~140 MB (it loads torch.compile); tests/test_export.py holds every recipe's result
    equal to what those models validate and dump. routers: MoE router modules, listed in ignore as
    llm-compressor lists them (vLLM builds some routers as quantizable Linears: Qwen-MoE's gate).
    """
    from importlib import metadata

    if recipe.format == "fp8":
        return legacy_fp8_config(recipe, routers)
    weights = quantization_args(recipe.weights)
    if recipe.algorithm == "gptq":  # compressed-tensors records GPTQ's column order with the weights
        weights["actorder"] = recipe.gptq.actorder
    scheme = {"format": None, "input_activations": quantization_args(recipe.input_activations),
              "output_activations": None, "targets": list(recipe.targets), "weights": weights}
    return {"config_groups": {"group_0": scheme}, "format": recipe.compression_format,
            "global_compression_ratio": None, "ignore": [*recipe.ignore, *routers],
            "kv_cache_scheme": quantization_args(recipe.kv_cache_scheme),
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": metadata.version("compressed-tensors")}


def quantization_args(args: Args | None) -> dict | None:
    """compressed-tensors' QuantizationArgs as it serialises them: defaults filled in, no observer for
    dynamic (run-time) scales, and a searched weight observer with the settings it ran with."""
    if args is None:
        return None
    if args.observer != "minmax":
        return {**QUANTIZATION_ARGS_DEFAULTS, **args.as_dict(), "observer": args.observer,
                "observer_kwargs": args.search}
    return {**QUANTIZATION_ARGS_DEFAULTS, **args.as_dict(), "observer": None if args.dynamic else "memoryless_minmax"}


def legacy_fp8_config(recipe: Recipe, routers: list = ()) -> dict:
    """The AutoFP8 / vLLM `quant_method: fp8` config: per-tensor FP8 weights, static or dynamic activations."""
    config = {"quant_method": "fp8", "ignored_layers": [*recipe.ignore, *routers],
              "activation_scheme": "dynamic" if recipe.input_activations.dynamic else "static"}
    if recipe.kv_cache_scheme is not None:
        config["kv_cache_scheme"] = "static"
    return config


def routers(facts: dict, family) -> list:
    """The MoE router modules of a model (none for dense families), by checkpoint name."""
    from builder.release import families

    return [tensor.name[: -len(".weight")] for tensor in families.tensors(facts, family) if tensor.cls == "router"]


def write_config(source: dict, out: Path, recipe: Recipe, routers: list = ()) -> None:
    """The source config.json, normalised, with the output dtype and quantization_config."""
    config = {k: v for k, v in source.items() if k not in UNSTABLE_CONFIG_KEYS}
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    if recipe.format != "dense":
        config["quantization_config"] = quantization_config(recipe, routers)
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
