"""Dequantize a checkpoint published quantized into plain floating safetensors, one tensor at a time: what
`builder model add` and `builder import` (source kind `quantized`) make of DeepSeek-V3/Kimi K2/Qwen3-FP8
block FP8, gpt-oss's MXFP4 experts, compressed-tensors FP8/INT/NVFP4/MXFP4/MXFP8 releases.

    builder model add deepseek-v3 ~/ckpt/DeepSeek-V3   # quantized: kept in weights/deepseek-v3-quantized/,
                                                       # dequantized into weights/deepseek-v3/

Where: once, at import. weights/<model>/ then holds the checkpoint in its config's floating dtype
(BF16 unless config.json says float16/float32), in the source's shard files, with quantization_config
removed; every recipe, BF16 included, builds from it as from any other source. The values are a function
of the source bytes alone: each weight is dequantized with compressed-tensors' own arithmetic in the
dtypes it uses (codes cast to the scale's dtype, minus the zero point, times the scale, then cast), so the
result equals what compressed-tensors' decompressors and transformers' FP8 dequantization give. gpt-oss
(`quant_method: mxfp4`) stores each fused expert projection as `<name>_blocks` (E2M1 pairs [E, rows, G, 16])
and `<name>_scales` (E8M0 [E, rows, G]); it is written back as `<name>` [E, G * 32, rows], the orientation
of the BF16 checkpoint, with transformers' arithmetic (E2M1 value times 2^(scale - 127) in FP32, one rounding).
Scales of activations and the KV cache (input_scale, k_scale, ...) are dropped: a recipe calibrates anew.
"""

import fnmatch
import json
import shutil
from pathlib import Path

from builder import tensorfile
from builder.errors import BuilderError, Problem
from builder.source.load import weight_files
from builder.tensorfile import Output, index_of, read_header, torch_dtype

# compressed-tensors formats read (a config group's `format`, or the config's own)
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized",
           "mxfp4-pack-quantized", "mxfp8-quantized")
SUPPORTED = ("legacy FP8 (quant_method: fp8, per-tensor or weight_block_size), gpt-oss MXFP4 (quant_method: "
             "mxfp4), and compressed-tensors " + ", ".join(FORMATS))
DROPPED = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
           "k_scale", "v_scale", "q_scale", "kv_scale")   # activation and KV-cache scales
COMPANIONS = ("weight_scale", "weight_scale_inv", "weight_zero_point", "weight_global_scale", "weight_shape",
              "weight_g_idx")
OTHER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")  # configs, tokenizers, templates
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def quantization(config: dict) -> dict | None:
    """config.json's quantization_config (or the older compression_config), or None for a plain source."""
    return config.get("quantization_config") or config.get("compression_config")


def unreadable(config: dict, shown: str) -> list:
    """Why this quantized config cannot be read (empty when it can)."""
    scheme = quantization(config)
    method = scheme.get("quant_method")
    file = f"{shown}/config.json"
    if method in ("fp8", "mxfp4"):
        return []
    if method != "compressed-tensors":
        return [Problem(file, "quantization_config.quant_method", f"{method!r}: quantized sources are read "
                        f"in {SUPPORTED}; dequantize this one to BF16 first")]
    found = {scheme.get("format")} | {group.get("format") for group in (scheme.get("config_groups") or {}).values()}
    unknown = sorted(str(name) for name in found - set(FORMATS) - {None, "dense", "mixed-precision"})
    return [Problem(file, "quantization_config.format", f"{name!r} is not read; quantized sources are read in "
                    f"{SUPPORTED}") for name in unknown]


def source_format(config: dict) -> str:
    """A short name of what the source is, for the model spec: fp8 or compressed-tensors/<formats>."""
    scheme = quantization(config)
    if scheme["quant_method"] == "fp8":
        return "fp8-block" if scheme.get("weight_block_size") else "fp8"
    if scheme["quant_method"] == "mxfp4":
        return "mxfp4 (gpt-oss experts)"
    found = {scheme.get("format")} | {g.get("format") for g in (scheme.get("config_groups") or {}).values()}
    return "compressed-tensors/" + "+".join(sorted(str(name) for name in found - {None, "mixed-precision"}))


def block_structure(config: dict) -> tuple | None:
    """The [rows, columns] weight block of a block-quantized source (legacy or compressed-tensors)."""
    scheme = quantization(config)
    if scheme.get("weight_block_size"):
        return tuple(scheme["weight_block_size"])
    for group in (scheme.get("config_groups") or {}).values():
        if (group.get("weights") or {}).get("block_structure"):
            return tuple(group["weights"]["block_structure"])
    return None


def plan(names, config: dict) -> dict:
    """output tensor name -> (module, kind): kind "plain" (copied), or how a quantized weight is stored
    ("weight" for an FP8/INT8 value tensor, "packed" for weight_packed, "blocks" for gpt-oss's fused MXFP4
    `<name>_blocks`, whose module is the output name). Companion and activation tensors have no output."""
    stored = set(names)
    outputs = {}
    mxfp4 = quantization(config).get("quant_method") == "mxfp4"
    for name in sorted(stored):
        module, _, leaf = name.rpartition(".")
        fused = name.removesuffix("_blocks") if name.endswith("_blocks") else name.removesuffix("_scales")
        if mxfp4 and {f"{fused}_blocks", f"{fused}_scales"} <= stored:
            if name.endswith("_blocks"):
                outputs[fused] = (fused, "blocks")
        elif leaf == "weight_packed":
            outputs[f"{module}.weight"] = (module, "packed")
        elif leaf == "weight" and ({f"{module}.weight_scale", f"{module}.weight_scale_inv"} & stored):
            outputs[name] = (module, "weight")
        elif leaf not in COMPANIONS + DROPPED:
            outputs[name] = (module, "plain")
    return outputs


def expand(scale, rows: int, columns: int, block: tuple | None, g_idx=None):
    """A weight scale broadcast to [rows, columns]: per tensor, per row, per block (ceil-divided), or per
    group of columns (g_idx: each column's group)."""
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if tuple(scale.shape) == (rows, 1):
        return scale
    if block and tuple(scale.shape) == (-(-rows // block[0]), -(-columns // block[1])):
        return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    if scale.shape[0] == rows:
        if g_idx is not None:
            return scale[:, g_idx.long()]
        return scale.repeat_interleave(-(-columns // scale.shape[1]), 1)[:, :columns]
    raise ValueError(f"scale of shape {list(scale.shape)} fits no strategy for a [{rows}, {columns}] weight")


def unpack_int32(packed, num_bits: int, length: int, dim: int):
    """compressed-tensors' pack-quantized words back to signed integers (int32) along dim, cut to length."""
    import torch

    per_word, mask, half = 32 // num_bits, (1 << num_bits) - 1, 1 << (num_bits - 1)
    words = packed if dim == 1 else packed.t()
    shifts = torch.arange(per_word, dtype=torch.int32) * num_bits
    values = (words.unsqueeze(-1) >> shifts).bitwise_and(mask).reshape(words.shape[0], -1)[:, :length] - half
    return values if dim == 1 else values.t()


def fp4_values(packed, columns: int):
    """FP4 E2M1 codes, two per byte (low nibble first), as float32 values [rows, columns]."""
    import torch

    from builder import minifloat

    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :columns]
    return minifloat.e2m1(nibbles)


def e8m0(scale):
    """OCP microscaling E8M0 exponents (uint8, bias 127) as the BF16 powers of two compressed-tensors uses."""
    import torch

    from builder import minifloat

    return minifloat.e8m0(scale, torch.bfloat16)


def fused_mxfp4(blocks, scales, dtype):
    """gpt-oss's MXFP4 experts (blocks [E, rows, G, 16] uint8, scales [E, rows, G] E8M0) as dtype
    [E, G * 32, rows]: the E2M1 value in dtype (exact), then torch.ldexp by scale - 127 in place, as
    transformers' convert_moe_packed_tensors does (so E8M0 255, "NaN", gives what it gives). One expert's
    temporaries at a time (gpt-oss-120b's gate_up_proj would be 8.5 GB of FP32 at once)."""
    import torch

    experts, rows, groups, width = blocks.shape
    out = torch.empty((experts, groups * width * 2, rows), dtype=dtype)
    for expert in range(experts):
        values = fp4_values(blocks[expert].reshape(-1, width), width * 2).to(dtype).reshape(rows, groups, -1)
        torch.ldexp(values, scales[expert].to(torch.int32).unsqueeze(-1) - 127, out=values)
        out[expert] = values.reshape(rows, groups * width * 2).t()
    return out


def weight(read, module: str, kind: str, stored: set, config: dict, dtype):
    """One quantized weight of the source, dequantized to dtype [rows, columns] (gpt-oss's fused
    experts: [experts, columns, rows])."""
    import torch

    if kind == "blocks":
        return fused_mxfp4(read(f"{module}_blocks"), read(f"{module}_scales"), dtype)

    def get(leaf):
        return read(f"{module}.{leaf}") if f"{module}.{leaf}" in stored else None

    scale = get("weight_scale")
    scale = get("weight_scale_inv") if scale is None else scale
    zero, g_idx = get("weight_zero_point"), get("weight_g_idx")
    if kind == "weight":  # FP8 or INT8 values
        values = read(f"{module}.weight")
        if scale.dtype == torch.uint8:  # MXFP8: E8M0 scales per 32 columns
            scale = e8m0(scale)
        codes = values.to(scale.dtype)
    elif scale.dtype == torch.float8_e4m3fn:  # NVFP4: E4M3 group scales over an FP32 global scale
        packed = read(f"{module}.weight_packed")
        codes = fp4_values(packed, packed.shape[1] * 2)
        scale = scale.to(torch.bfloat16) / get("weight_global_scale")
        codes = codes.to(scale.dtype)
    elif scale.dtype == torch.uint8:  # MXFP4: E8M0 scales per 32 columns
        packed = read(f"{module}.weight_packed")
        scale = e8m0(scale)
        codes = fp4_values(packed, packed.shape[1] * 2).to(scale.dtype)
    else:  # pack-quantized integers in int32 words
        rows, columns = (int(v) for v in get("weight_shape").tolist())
        packed = read(f"{module}.weight_packed")
        num_bits = bits_of(packed, columns)
        codes = unpack_int32(packed, num_bits, columns, 1).to(scale.dtype)
        if zero is not None and zero.dtype == torch.int32:
            zero = unpack_int32(zero, num_bits, scale.shape[0], 0)
    rows, columns = codes.shape
    block = block_structure(config)
    if zero is not None:
        codes = codes - expand(zero, rows, columns, block, g_idx).to(scale.dtype)
    return (codes * expand(scale, rows, columns, block, g_idx)).to(dtype)


def bits_of(packed, columns: int) -> int:
    """The integer width of pack-quantized words: the one of 4 or 8 bits whose words hold `columns` values."""
    for bits in (4, 8, 2):
        if packed.shape[1] == -(-columns // (32 // bits)):
            return bits
    raise ValueError(f"{packed.shape[1]} int32 words per row fit no 2/4/8-bit packing of {columns} columns")


def dequantize_checkpoint(source: Path, out: Path) -> None:
    """Write out/ = source's checkpoint dequantized (module docstring), shard by shard, one weight in memory
    at a time, with its other files (configs, tokenizer) copied and quantization_config removed."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    problems_found = unreadable(config, source.name)
    if problems_found:
        raise BuilderError(problems_found)
    dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    dtype = torch_dtype(OUTPUT_DTYPES.get(dtype_name, "BF16"))
    files = weight_files(source)
    tensors = index_of(files)
    stored = set(tensors)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    with tensorfile.reader(tensors) as read:
        for file in files:
            planned = plan(read_header(file), config)
            outputs = [Output(name, torch_dtype(tensors[name].dtype), tuple(tensors[name].shape)) if kind == "plain"
                       else Output(name, dtype, shape_of(read, tensors, module, kind))
                       for name, (module, kind) in sorted(planned.items())]

            def produce(name, planned=planned):
                module, kind = planned[name]
                if kind == "plain":
                    return read(name)
                try:
                    return weight(read, module, kind, stored, config, dtype)
                except ValueError as error:
                    raise BuilderError(Problem(f"{source.name}/{file.name}", f"{module}.weight", str(error))) from None

            tensorfile.write(out / file.name, outputs, produce)
            weight_map.update({output.name: file.name for output in outputs})
    copy_other_files(source, out, config, weight_map)


def shape_of(read, tensors: dict, module: str, kind: str) -> tuple:
    """The [rows, columns] a quantized weight dequantizes to ([experts, columns, rows] for fused MXFP4)."""
    if kind == "blocks":
        blocks, scales = tensors[f"{module}_blocks"], tensors[f"{module}_scales"]
        if len(blocks.shape) != 4 or list(blocks.shape[:-1]) != list(scales.shape) or blocks.dtype != "U8":
            raise BuilderError(Problem(blocks.file.name, f"{module}_blocks", f"MXFP4 blocks {list(blocks.shape)} "
                                       f"({blocks.dtype}) with scales {list(scales.shape)}: expected U8 [experts, "
                                       "rows, groups, 16] and scales [experts, rows, groups]"))
        experts, rows, groups, width = blocks.shape
        return (experts, groups * width * 2, rows)
    stored = tensors[f"{module}.weight" if kind == "weight" else f"{module}.weight_packed"]
    if len(stored.shape) != 2:
        raise BuilderError(Problem(stored.file.name, f"{module}.weight", f"a quantized weight of shape "
                                   f"{list(stored.shape)}: only 2-D (per-Linear) quantized weights are read"))
    if kind == "weight":
        return tuple(stored.shape)
    if f"{module}.weight_shape" in tensors:  # pack-quantized keeps the shape it packed
        return tuple(int(v) for v in read(f"{module}.weight_shape").tolist())
    return (stored.shape[0], stored.shape[1] * 2)  # FP4: two codes per byte


def copy_other_files(source: Path, out: Path, config: dict, weight_map: dict) -> None:
    """config.json without its quantization_config, the index with the dequantized names, the other configs,
    tokenizer files and templates as they are (never pickles or code)."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()
                       and any(fnmatch.fnmatch(p.name, pattern) for pattern in OTHER_FILES)):
        relative = path.relative_to(source)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.as_posix() == "config.json":
            plain = {key: value for key, value in config.items()
                     if key not in ("quantization_config", "compression_config")}
            (out / relative).write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif relative.as_posix() == "model.safetensors.index.json":
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (out / relative).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, out / relative)
