"""Write an artifact's model files in its format: the one safetensors write path every safetensors
format shares (plan -> shards -> streamed write -> index, config.json, tokenizer and side files), or
the writer of a format with a container of its own (builder/formats/)."""

import shutil
from pathlib import Path

from builder import formats, tensorfile
from builder.artifact import shards, stream
from builder.canonical import file_entry, pretty_json
from builder.errors import BuilderError, Problem
from builder.quant import quantize
from builder.quant.results import Calibration
from builder.release.recipe import Recipe
from builder.source.inputs import BuildInputs
from builder.source.load import WEIGHT_FILES


def write_model(staging: Path, spec: dict, source: BuildInputs, calibration: Calibration | None) -> list:
    """Weights, config and tokenizer files in the recipe's format; returns the file entries of the
    weights hashed while written. source: the build's prepared inputs (builder/build.py prepare)."""
    recipe = source.recipe
    fmt = formats.of(recipe.format)
    if fmt.CONTAINER != formats.SAFETENSORS:
        targeted = {name for name, stored in source.tensors.items()
                    if quantize.targeted(name, stored.shape, source.modules, recipe)}
        return fmt.write(staging, spec, source, targeted, calibration, quantize.arithmetic(recipe, calibration))
    weights = write_weights(staging, source.tensors, source.modules, source.family, recipe,
                            spec["target"]["max_shard_bytes"], calibration,
                            tied=bool(source.config.get("tie_word_embeddings")),  # hashed as written
                            seen=source.digest.reader(source.tensors))  # the source hashed as read
    write_config(source.config, staging, recipe, routers(source.facts, source.family))
    copy_side_files(source.path, staging)
    return weights


def plan_outputs(tensors: dict, modules: dict, family, recipe: Recipe, tied: bool = False) -> dict:
    """source name -> the format's Outputs for it (sorted by name; a source it drops is left out),
    without computing anything.

    Raises BuilderError when the recipe quantizes the KV cache and a decoder layer would get no k or
    v scale (an architecture whose projections the family table does not name)."""
    fmt = formats.of(recipe.format)
    groups, kv_written = {}, set()
    for name in sorted(tensors):
        stored = tensors[name]
        kv = quantize.kv_scales(name, family, recipe)
        kv_written.update(key for key, _ in kv)
        outputs = fmt.plan(name, tensorfile.torch_dtype(stored.dtype), stored.shape,
                           quantize.targeted(name, stored.shape, modules, recipe), recipe, kv, tied)
        if outputs:
            groups[name] = outputs
    if recipe.kv_cache_scheme is not None:
        expected = {f"{name}.{scale}" for name in modules if name.endswith(".self_attn")
                    for scale in ("k_scale", "v_scale")}
        missing = sorted(expected - kv_written)
        if missing:
            raise BuilderError(Problem("quant", "kv_cache_scheme", f"no projection makes {', '.join(missing[:4])}"
                                       f"{' ...' if len(missing) > 4 else ''}: the family table names none"))
    return groups


def write_weights(out: Path, tensors: dict, modules: dict, family, recipe: Recipe, max_shard_bytes: int,
                  calibration: Calibration | None = None, tied: bool = False, seen=None) -> list:
    """Quantize and write every tensor in the recipe's safetensors format: each source read and
    quantized once, each output written at its planned offset, each file hashed once as it fills
    (builder.artifact.stream).

    calibration: builder.quant.calibrate's statistics and GPTQ weights, for recipes that calibrate.
    seen(name, tensor): each source tensor as read (builder.artifact.stream.write_shards).
    Returns the weight files' entries ({path, sha256, size}), for the manifest and provenance.
    """
    fmt, arithmetic = formats.of(recipe.format), quantize.arithmetic(recipe, calibration, tensors)
    planned = plan_outputs(tensors, modules, family, recipe, tied)
    groups = list(planned.values())
    assigned = shards.assign(groups, max_shard_bytes)
    names = shards.shard_names(len(assigned))
    sources = [(name, tensorfile.nbytes(tensorfile.torch_dtype(tensors[name].dtype), tensors[name].shape))
               for name in planned]
    targeted = {name: quantize.targeted(name, tensors[name].shape, modules, recipe) for name in planned}

    def compute(name, tensor):
        tensor = quantize.smoothed(name, tensor, calibration)
        if not targeted[name]:
            return {name: quantize.unquantized(name, tensor, recipe)}
        return fmt.compute(name, tensor, recipe, arithmetic)

    def known(name):
        kv = quantize.kv_scales(name, family, recipe)
        if not (targeted[name] or kv):
            return {}
        return fmt.known(name, tensors[name].shape, targeted[name], recipe, calibration, kv, arithmetic)

    with tensorfile.reader(tensors) as read:
        entries = stream.write_shards(out, sources, groups, assigned, names, read, compute, known, seen)
    if len(names) > 1:
        (out / WEIGHT_FILES[1]).write_text(pretty_json(shards.index(assigned, names)), encoding="utf-8")
        entries.append(file_entry(out, WEIGHT_FILES[1]))
    return entries


def routers(facts: dict, family) -> list:
    """The modules a quantized artifact names in ignore beside the recipe's, by checkpoint name: MoE routers
    (none for dense families), and the Linears and routers of multi-token-prediction layers, which stay in
    the output dtype (vLLM's MTP layer takes the model's quantization config and reads them unquantized
    only when ignore names them)."""
    from builder.release import families

    return [tensor.name[: -len(".weight")] for tensor in families.tensors(facts, family)
            if tensor.cls in ("router", "mtp_linear") and tensor.name.endswith(".weight")]


def write_config(source: dict, out: Path, recipe: Recipe, routers: list = ()) -> None:
    """config.json as the recipe's format writes it (the source's, normalised, and its quantization block)."""
    config = formats.of(recipe.format).config(source, recipe, routers)
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
