"""Format gguf: one GGUF file for llama.cpp. The architecture's metadata, the tokenizer.ggml.* keys
from the source's tokenizer files, tensors named and laid out as llama.cpp's converter writes them
(q/k rows permuted for llama-architecture models), in BF16/F16/F32, Q8_0 or Q4_0, or in the per-tensor
type mix of llama-quantize's Q4_K_M / Q5_K_M presets (quant.ggml_mix; kmix.py): Q4_K / Q5_K / Q6_K
K-quants where rows are a multiple of 256 values, Q5_0 / Q5_1 / Q8_0 where not.

    builder build smollm2-135m-instruct-gguf-q4_0 && llama-cli -m artifacts/smollm2-135m-instruct-gguf-q4_0/*.gguf

Streamed with gguf's GGUFWriter: every tensor's name, shape and type is declared first (sizes follow
from shapes), then each source tensor is read, converted and written in turn, one in memory at a time.
Deterministic: fixed key and tensor order, no timestamps, paths or UUIDs; general.* comes from the spec.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from builder import failpoints, tensorfile
from builder.console import progress
from builder.errors import BuilderError, Problem
from builder.formats import checks, gguf_vocab, kmix
from builder.paths import gguf_name

VERSION = 1            # the GGUF file: metadata, tokenizer keys, tensor names, order and types
PACKAGES = ("gguf", "tokenizers")  # the writer and its tensor-name tables; the pre-tokenizer's hash
QUANTIZER = "quantize.ggml"
# transformers model_type -> llama.cpp's architecture name (general.architecture; Mistral is "llama"
# there, as llama.cpp's converter writes it)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
UNSCALED_ROPE_ONLY = True  # resolve refuses scaled RoPE (families.layout_problems)
CONTAINER = ".gguf"
LIBRARY = "gguf"
VLLM = "gguf"
# llama.cpp's block types a recipe's weights can be: (num_bits, group_size, symmetric) -> type.
BLOCK_TYPES = {(8, 32, True): "Q8_0", (4, 32, True): "Q4_0"}
# A type mix (quant.ggml_mix): the weights arguments of its main type, which 4- or 5-bit values in groups
# of 32 with a scale and a min each (asymmetric) are; each tensor's type is kmix.tensor_type's.
MIX_WEIGHTS = {"Q4_K_M": (4, 32, False), "Q5_K_M": (5, 32, False)}
# An unquantized (or untargeted) tensor's GGML type, from the recipe's dtype, and back to torch's name.
DENSE_TYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
TORCH_NAMES = {kind: name for name, kind in DENSE_TYPES.items()}
# The type a whole file is labelled with (general.file_type, llama.cpp's LlamaFileType).
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32,
              **{preset: entry["file_type"] for preset, entry in kmix.PRESETS.items()}}
# Where each quantized block keeps its (super-block) F16 scale d, in bytes from the block's start.
SCALE_OFFSETS = {"Q8_0": 0, "Q4_0": 0, "Q5_0": 0, "Q5_1": 0, "Q4_K": 0, "Q5_K": 0, "Q6_K": 208}
PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")  # llama.cpp's rope pairs rows differently from HF's
# vocabulary() key -> the GGUFWriter method that writes it with its GGUF type
TOKENIZER_KEYS = {"model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
                  "token_type": "add_token_types", "merges": "add_token_merges",
                  "bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
                  "unk_token_id": "add_unk_token_id", "pad_token_id": "add_pad_token_id",
                  "add_bos_token": "add_add_bos_token", "add_eos_token": "add_add_eos_token",
                  "add_space_prefix": "add_add_space_prefix", "chat_template": "add_chat_template"}
WRITER_NAME = "quant-release-builder"


def problems(recipe, rules) -> list:
    """llama.cpp's Q8_0 or Q4_0 blocks (imatrix rounding for Q4_0; Q8_0 takes no importance), or a type mix
    whose weights arguments are its main type's (rtn or imatrix)."""
    if recipe.weights is None:
        return checks.unquantized(recipe) + ([(("quant", "ggml_mix"), "must be null when weights is null")]
                                             if recipe.ggml_mix is not None else [])
    if recipe.ggml_mix is not None:
        bits, group, symmetric = MIX_WEIGHTS[recipe.ggml_mix]
        return checks.runtime_types(
            recipe, f"{recipe.ggml_mix}'s main type {kmix.PRESETS[recipe.ggml_mix]['default']} as weights: type "
            f"int, num_bits {bits}, strategy group, group_size {group}, symmetric false",
            lambda args: (args.type, args.strategy, args.num_bits, args.group_size, args.symmetric) ==
            ("int", "group", bits, group, symmetric), ("rtn", "imatrix"))

    def fits(args):
        return args.type == "int" and args.strategy == "group" and \
            (args.num_bits, args.group_size, args.symmetric) in BLOCK_TYPES
    four_bit = recipe.weights.num_bits == 4
    return checks.runtime_types(recipe, "llama.cpp's Q8_0 (int 8) or Q4_0 (int 4) blocks: type int, strategy "
                                "group, group_size 32, symmetric (K-quants: quant.ggml_mix)", fits,
                                ("rtn", "imatrix") if four_bit else ("rtn",))


def recognizes(folder: Path, config: dict | None) -> bool:
    return any(folder.glob(f"*{CONTAINER}"))


def load(folder: Path, config: dict | None, decode=None):
    """The weights dequantized by gguf's own decoders through transformers' GGUF loader, the config
    read from the file's keys; FP32."""
    import torch
    from transformers import AutoModelForCausalLM

    name = sorted(folder.glob(f"*{CONTAINER}"))[0].name
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                trust_remote_code=False).eval()


def prepare(path: Path, config: dict, spec: dict) -> dict:
    """What the file needs from the source besides tensors, read and checked before anything is written."""
    return {"vocabulary": gguf_vocab.vocabulary(path, config, spec["model"]["path"])}


def file_name(spec: dict) -> str:
    """The GGUF file's name: the release's name, since the file travels alone."""
    return gguf_name(spec["release"]["name"])


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: where it comes from and what it becomes."""

    source: str        # checkpoint name
    name: str          # GGUF name
    kind: str          # GGML type: F32, F16, BF16, Q8_0, Q4_0; with a mix Q4_K, Q5_K, Q6_K, Q5_0, Q5_1
    shape: tuple       # logical shape, torch order ([out, in])
    heads: int | None  # rows are permuted in groups of this many heads (q/k of llama models), else None

    @property
    def nbytes(self) -> int:
        import gguf

        rows = 1
        for size in self.shape[:-1]:
            rows *= size
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.kind]]
        return rows * self.shape[-1] // block * block_bytes


def weight_type(recipe) -> str:
    """The GGML type of the recipe's quantized weights (or of every 2-D tensor when none is quantized); a
    mix's preset name (its file type; kmix.tensor_type gives each tensor's)."""
    if recipe.weights is None:
        return DENSE_TYPES[recipe.dtype]
    if recipe.ggml_mix is not None:
        return recipe.ggml_mix
    return BLOCK_TYPES[(recipe.weights.num_bits, recipe.weights.group_size, recipe.weights.symmetric)]


def mixed_type(recipe, name: str, shape: tuple, config: dict) -> str:
    """The GGML type llama-quantize's preset gives a targeted weight (GGUF name, torch shape [out, in]);
    the recipe's dtype where it would keep the tensor as it is."""
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    kind = kmix.tensor_type(recipe.ggml_mix, name, layer, config["num_hidden_layers"], shape[-1],
                            tied=bool(config.get("tie_word_embeddings")))
    return DENSE_TYPES[recipe.dtype] if kind is None else kind


def plan(tensors: dict, targeted: set, config: dict, recipe, architecture: str) -> list:
    """Every tensor of the file, in order (checkpoint names sorted), without reading any.

    targeted: the checkpoint names of the weights the recipe quantizes."""
    import gguf

    arch = {name: value for value, name in gguf.MODEL_ARCH_NAMES.items()}[architecture]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    found, unnamed = [], []
    for source in sorted(tensors):
        shape = tensors[source].shape
        if source == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reads the output projection from token_embd
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            unnamed.append(source)
            continue
        if len(shape) == 1 or name.endswith("_norm.weight") or not source.endswith(".weight"):
            kind = "F32"  # norms, biases: F32 whatever the file type, as the converter writes them
        elif source in targeted:
            kind = weight_type(recipe) if recipe.ggml_mix is None else mixed_type(recipe, name, shape, config)
        else:
            kind = DENSE_TYPES[recipe.dtype]
        module = source.rsplit(".", 1)[0]
        permuted = architecture == "llama" and module.endswith(PERMUTED)
        group = (heads if module.endswith("q_proj") else kv_heads) if permuted else None
        found.append(Planned(source, name, kind, tuple(shape), group))
    if unnamed:
        raise BuilderError(Problem("source weights", unnamed[0], f"no GGUF tensor name for {architecture} "
                                   f"({len(unnamed)} tensors like this)"))
    return found


def permute(weight, heads: int):
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (LlamaModel.permute)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert(planned: Planned, tensor, importance, arithmetic):
    """A source tensor as the bytes of its GGUF type (uint8, or a dtype whose bytes are the data);
    arithmetic.weight rounds llama.cpp's blocks."""
    import torch

    arithmetic.finite(planned.source, tensor)
    if planned.heads is not None:
        tensor = permute(tensor, planned.heads)
    if planned.kind not in TORCH_NAMES:
        return arithmetic.weight(tensor, planned.kind, importance)
    converted = tensor.to(getattr(torch, TORCH_NAMES[planned.kind]))
    if not bool(torch.isfinite(converted).all()):
        raise BuilderError(Problem("source weights", planned.source, f"exceeds the range of {planned.kind}; "
                                   "choose quant.dtype=bfloat16"))
    return converted.contiguous()


def metadata(writer, spec: dict, config: dict, recipe, vocabulary: dict) -> None:
    """general.*, the architecture's hyper-parameters and the tokenizer, in llama.cpp's converter's order."""
    import gguf

    model, release = spec["model"], spec["release"]
    writer.add_type("model")
    writer.add_name(release["name"])
    writer.add_version(release["version"])
    writer.add_license(model["license"])
    writer.add_quantized_by(WRITER_NAME)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, model["id"])
    writer.add_base_model_repo_url(0, f"https://huggingface.co/{model['id']}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(FILE_TYPES[weight_type(recipe)])
    if writer.arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    for key, value in vocabulary.items():
        getattr(writer, TOKENIZER_KEYS[key])(value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write(staging: Path, spec: dict, source, targeted: set, calibration, arithmetic) -> list:
    """Write the release's GGUF file into staging; returns [] (it is hashed with the other files).

    source: the build's prepared inputs (builder/source/inputs.py BuildInputs: tensor index, config,
    recipe, family, this format's prepare() as layout); targeted: the names of the weights the recipe
    quantizes; calibration: builder/quant/results.py Calibration, or None."""
    import gguf
    import numpy
    import torch

    recipe, config = source.recipe, source.config
    architecture = FAMILIES[source.family.model_type]
    planned = plan(source.tensors, targeted, config, recipe, architecture)
    importance = calibration.importance if calibration and recipe.algorithm == "imatrix" else {}
    writer = gguf.GGUFWriter(None, architecture)
    metadata(writer, spec, config, recipe, source.layout["vocabulary"])
    for tensor in planned:
        # any element type but uint8 makes the writer take the shape as the logical one
        writer.add_tensor_info(tensor.name, tensor.shape, numpy.dtype(numpy.float32), tensor.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[tensor.kind])
    path = staging / file_name(spec)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tensorfile.reader(source.tensors) as read, \
                progress(total=len(planned), desc="quantize", unit="tensor") as bar:
            for index, tensor in enumerate(planned):
                imatrix = importance.get(tensor.source.rsplit(".", 1)[0])
                data = convert(tensor, read(tensor.source), imatrix, arithmetic)
                writer.write_tensor_data(data.view(torch.uint8).numpy())
                bar.update()
                if index == len(planned) // 2:
                    failpoints.reached("quantize")
    finally:
        writer.close()
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return []


def summary(file: Path, details: bool) -> dict:
    """builder summary for a GGUF file: bytes per GGML type; per tensor its type, shape (torch order)
    and, for quantized types, the block scales' min/max/mean (each (super-)block's F16 d)."""
    import gguf
    import numpy

    rows, found = {}, {}
    for tensor in gguf.GGUFReader(file).tensors:
        kind = tensor.tensor_type.name
        row = rows.setdefault(kind, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += int(tensor.n_bytes)
        if details:
            module, _, suffix = tensor.name.rpartition(".")
            entry = {"dtype": kind, "shape": [int(size) for size in reversed(tensor.shape)]}
            block = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
            if kind in SCALE_OFFSETS:
                at = SCALE_OFFSETS[kind]
                scales = numpy.asarray(tensor.data).reshape(-1, block)[:, at:at + 2].copy().view(numpy.float16)
                entry.update(min=float(scales.min()), max=float(scales.max()), mean=float(scales.astype(numpy.float64).mean()))
            found.setdefault(module, {})[suffix] = entry
    rows["total"] = {key: sum(row[key] for row in rows.values()) for key in ("tensors", "bytes")}
    return {"dtypes": rows, **({"layers": dict(sorted(found.items()))} if details else {})}


def difference(have: Path, want: Path) -> str:
    """'; first differing key / tensor NAME' for two GGUF files (metadata in order, then tensor data)."""
    import gguf
    import numpy

    try:
        readers = gguf.GGUFReader(have), gguf.GGUFReader(want)
    except (ValueError, OSError) as error:
        return f"; unreadable GGUF ({error})"
    fields = [{name: [numpy.asarray(part).tobytes() for part in field.parts] for name, field in r.fields.items()}
              for r in readers]
    for name in sorted(set(fields[0]) | set(fields[1])):
        if fields[0].get(name) != fields[1].get(name):
            return f"; first differing key: {name}"
    tensors = [{t.name: t for t in r.tensors} for r in readers]
    for name in sorted(set(tensors[0]) | set(tensors[1])):
        a, b = tensors[0].get(name), tensors[1].get(name)
        if a is None or b is None:
            return f"; tensor {name} is {'missing' if a is None else 'not in the rebuild'}"
        if a.tensor_type != b.tensor_type or numpy.asarray(a.data).tobytes() != numpy.asarray(b.data).tobytes():
            return f"; first differing tensor: {name}"
    return "; keys and tensors equal (layout differs)"
