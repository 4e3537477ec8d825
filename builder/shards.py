"""Write safetensors shards as a stream: header first (planned from shapes), then tensor by tensor.

The bytes equal what `safetensors.torch.save_file(tensors, path, {"format": "pt"})` writes for the
same tensors, but no more than one tensor is ever held in memory.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names, in the order of its Rust `Dtype` enum: save_file lays out tensors by
# this rank, descending (wider types first, which keeps every tensor aligned), then by name.
DTYPE_ORDER = (
    ("BOOL", torch.bool), ("U8", torch.uint8), ("I8", torch.int8),
    ("F8_E5M2", torch.float8_e5m2), ("F8_E4M3", torch.float8_e4m3fn),
    ("I16", torch.int16), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I32", torch.int32), ("F32", torch.float32), ("F64", torch.float64), ("I64", torch.int64),
)
CODE = {dtype: code for code, dtype in DTYPE_ORDER}
RANK = {dtype: rank for rank, (_, dtype) in enumerate(DTYPE_ORDER)}
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Entry:
    """A tensor's place in a shard."""

    name: str
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int


def nbytes(dtype: torch.dtype, shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def plan(outputs: list) -> tuple:
    """Header bytes and data layout for tensors given as (name, dtype, shape)."""
    ordered = sorted(outputs, key=lambda o: (-RANK[o.dtype], o.name))
    entries, offset = [], 0
    for output in ordered:
        size = nbytes(output.dtype, output.shape)
        entries.append(Entry(output.name, output.dtype, tuple(output.shape), offset, offset + size))
        offset += size
    header = {"__metadata__": METADATA}
    for e in entries:
        header[e.name] = {"dtype": CODE[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, entries


def write(path: Path, outputs: list, produce) -> None:
    """Write one shard; produce(name) returns each tensor when its turn comes.

    Raises ValueError when a produced tensor's dtype or shape differs from its planned output.
    """
    header, entries = plan(outputs)
    with open(path, "wb") as handle:
        handle.write(header)
        for entry in entries:
            tensor = produce(entry.name)
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {entry.dtype} {entry.shape}")
            handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        handle.flush()
        os.fsync(handle.fileno())


def assign(groups: list, max_bytes: int) -> list:
    """Pack groups of outputs (one group per source tensor, kept together) into shards in order."""
    shards, current, size = [], [], 0
    for group in groups:
        group_size = sum(nbytes(o.dtype, o.shape) for o in group)
        if current and size + group_size > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.extend(group)
        size += group_size
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list:
    """Hugging Face's file names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index(shards: list, names: list) -> dict:
    """model.safetensors.index.json for several shards."""
    weight_map = {o.name: file for outputs, file in zip(shards, names) for o in outputs}
    total = sum(nbytes(o.dtype, o.shape) for outputs in shards for o in outputs)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
