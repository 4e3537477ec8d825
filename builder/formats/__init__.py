"""Output formats: one module per format, all behind one small interface, and the registry (FORMATS).

    from builder import formats
    formats.of("gguf").problems(recipe)       # what resolve asks; build, eval, serve and card ask the same module

A format module holds everything about its format, as plain names (no classes, no inheritance):

    VERSION      output version of the part `format.<name>` (builder/release/identity.py reads it)
    PACKAGES     installed packages whose versions can change its bytes (the part's toolchain)
    QUANTIZER    the part that rounds its quantized weights: None for compressed-tensors' arithmetic
                 (quantize.float / quantize.int), else the runtime's own (quantize.ggml, quantize.affine);
                 a format whose rounding depends on the recipe also has quantizer(recipe) (mlx's modes)
    FAMILIES     model_type -> the runtime's architecture name, for a format written for a few model
                 families (None: every family the builder supports)
    UNSCALED_ROPE_ONLY  (optional) True: resolve refuses a model with scaled RoPE (gguf, mlx)
    CONTAINER    the file suffix its weights are written in: ".safetensors" (the shared write path,
                 builder/artifact/export.py) or a container of its own (".gguf")
    LIBRARY      the Hugging Face library that reads it (the model card's library_name)
    VLLM         vLLM's --quantization for it (None: none needed)
    problems(recipe, rules)              resolve: [(key path, message)] for arguments it cannot hold
                                         (rules(recipe): compressed-tensors' arithmetic checks, for
                                         formats that round with it)
    recognizes(folder, config)           whether an artifact folder holds this format (config None: no config.json)
    load(folder, config, decode)         evaluation: the artifact as a transformers model in FP32
    prepare(path, config, spec)          build: what it reads from the source before anything is written

A safetensors format (CONTAINER ".safetensors") also has, for the shared write path:

    SCALES                                            tensor-name suffixes that hold scales (builder summary)
    plan(name, dtype, shape, targeted, recipe, kv, tied)  the Outputs one source tensor becomes ([]: dropped)
    known(name, shape, targeted, recipe, calibration, kv, arithmetic)  those outputs that need no source values
    compute(name, tensor, recipe, arithmetic)         a targeted weight's outputs, from the source tensor
    config(source_config, recipe, routers)            config.json
    FUSED (optional)  transformers' fused experts class -> its 3-D parameters the format quantizes as they
                      are (quant/quantize.py targeted; mxfp4: gpt-oss's experts)
    (known and compute are asked only for targeted weights and KV scales: dense, which has none, has neither)

and a format with a container of its own: write(staging, spec, source, targeted, calibration,
arithmetic) -> the entries of the files it hashed while writing, file_name(spec), summary(file,
details), difference(have, want).

Formats sit just above the shared helpers and below release/ (resolve asks them for their checks), so
they import only shared helpers; what they need from higher floors comes as arguments: the recipe, the
tensor index (name -> tensorfile.StoredTensor), the build's inputs (builder.source.inputs.BuildInputs,
read by field), calibration (builder.quant.results.Calibration or None), and `arithmetic`
(builder.quant.quantize.Arithmetic: the rounding of the part QUANTIZER names, scales from maxima, the
finiteness check, and the decoding evaluation uses).

Adding a format: a module here, one line in FORMATS, a recipe file under specs/quant/, golden entries
(docs/architecture.md, "Formats").
"""

import json
from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.formats import compressed_tensors, dense, fp8, gguf, mlx, mxfp4

FORMATS = {"dense": dense, "compressed-tensors": compressed_tensors, "fp8": fp8, "gguf": gguf, "mlx": mlx,
           "mxfp4": mxfp4}
SAFETENSORS = ".safetensors"


def of(name: str):
    """The module of a format, by its name in specs (quant.format)."""
    if name not in FORMATS:
        raise BuilderError(Problem("quant", "format", f"{name}: unknown format; known: {', '.join(sorted(FORMATS))}"))
    return FORMATS[name]


def quantizer(recipe) -> str | None:
    """The part that rounds the recipe's weights in its format: its quantizer(recipe), else its QUANTIZER."""
    module = of(recipe.format)
    return module.quantizer(recipe) if hasattr(module, "quantizer") else module.QUANTIZER


def versions() -> dict:
    """part (format.<name>) -> output version, for every registered format."""
    return {f"format.{name}": module.VERSION for name, module in FORMATS.items()}


def packages() -> dict:
    """part (format.<name>) -> the packages whose versions can change its bytes (those that have any)."""
    return {f"format.{name}": module.PACKAGES for name, module in FORMATS.items() if module.PACKAGES}


def found_in(folder: Path) -> tuple:
    """(format module, config.json or None) of an artifact folder (a source checkpoint reads as dense)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    for module in FORMATS.values():
        if module.recognizes(folder, config):
            return module, config
    raise BuilderError(Problem(str(folder), "", "not an artifact (no config.json or .gguf file)"))
