"""The safetensors format, streamed: read headers and single tensors with plain file reads, and write
a file whose header and tensor offsets are planned from shapes, each tensor at its own offset when it
is ready (in any order). torch is imported on first use.

The bytes written equal `safetensors.torch.save_file(tensors, path, {"format": "pt"})` for the same
tensors, but no tensor has to wait in memory for another.
"""

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from builder.errors import BuilderError, Problem

# safetensors' dtype names, in the order of its Rust `Dtype` enum: save_file lays out tensors by
# this rank, descending (wider types first, which keeps every tensor aligned), then by name.
DTYPE_CODES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64")
TORCH_NAMES = ("bool", "uint8", "int8", "float8_e5m2", "float8_e4m3fn", "int16", "float16", "bfloat16",
               "int32", "uint32", "float32", "float64", "int64")
ELEMENT_BYTES = dict(zip(DTYPE_CODES, (1, 1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8)))
METADATA = {"format": "pt"}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


class StoredTensor(NamedTuple):
    """Where a tensor of a safetensors file lies and what it is (one row of a tensor index)."""

    file: Path   # the .safetensors file that holds it
    dtype: str   # its safetensors dtype code: "BF16", "F32", ...
    shape: tuple


@dataclass(frozen=True)
class Output:
    """One tensor a file will hold: its name, torch dtype and shape (planned before it is computed)."""

    name: str
    dtype: object  # torch.dtype
    shape: tuple


@dataclass(frozen=True)
class Entry:
    """A tensor's place in a file."""

    name: str
    dtype: object
    shape: tuple
    begin: int
    end: int


@cache
def torch_dtypes() -> dict:
    """safetensors dtype code -> torch dtype."""
    import torch

    return {code: getattr(torch, name) for code, name in zip(DTYPE_CODES, TORCH_NAMES)}


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code."""
    try:
        return torch_dtypes()[code]
    except KeyError:
        raise BuilderError(Problem("", "", f"unsupported tensor dtype {code}")) from None


def code_of(dtype) -> str:
    return {value: key for key, value in torch_dtypes().items()}[dtype]


def nbytes(dtype, shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * ELEMENT_BYTES[code_of(dtype)]


def read_header(file: Path) -> dict:
    """A safetensors header (name -> dtype, shape, offsets), checked against the file's size."""
    return header_and_start(file)[0]


def index_of(files) -> dict:
    """tensor name -> StoredTensor across the given safetensors files (a later file wins a repeated name)."""
    return {name: StoredTensor(file, info["dtype"], tuple(info["shape"]))
            for file in files for name, info in read_header(file).items()}


def header_and_start(file: Path) -> tuple:
    """(header, byte offset where tensor data begins), the header checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise BuilderError(Problem(file.name, "", "corrupt safetensors header (bad length)"))
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise BuilderError(Problem(file.name, "", "corrupt safetensors header (not JSON)")) from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end != size:
        raise BuilderError(Problem(file.name, "", f"truncated or padded: header promises "
                                   f"{8 + length + end} bytes, file has {size}"))
    return header, 8 + length


@contextmanager
def reader(tensors: dict):
    """read(name, into=None) -> a CPU tensor, for tensors given as a tensor index (name -> StoredTensor):
    a fresh one, or a view of the first bytes of `into` (a uint8 tensor at least that large).

    Plain file reads, no memory map: a memory-mapped checkpoint keeps every page it has touched
    resident (and counted in RSS) until it is unmapped, so reading a whole model through one grows
    the process by the model's size; here only the tensor being read is in memory.
    """
    import torch

    files = {}

    def read(name: str, into=None):
        stored = tensors[name]
        file, shape = stored.file, stored.shape
        if file not in files:
            header, start = header_and_start(file)
            files[file] = (open(file, "rb"), header, start)
        handle, header, start = files[file]
        begin, end = header[name]["data_offsets"]
        dtype = torch_dtype(stored.dtype)
        tensor = torch.empty(shape, dtype=dtype) if into is None else into[: end - begin].view(dtype).view(shape)
        handle.seek(start + begin)
        if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
            raise BuilderError(Problem(file.name, name, "truncated while reading (file changed during the build?)"))
        return tensor

    try:
        yield read
    finally:
        for handle, _, _ in files.values():
            handle.close()


def plan(outputs: list) -> tuple:
    """Header bytes and data layout for tensors given as Outputs (name, dtype, shape)."""
    rank = {dtype: index for index, dtype in enumerate(torch_dtypes().values())}
    ordered = sorted(outputs, key=lambda o: (-rank[o.dtype], o.name))
    entries, offset = [], 0
    for output in ordered:
        size = nbytes(output.dtype, output.shape)
        entries.append(Entry(output.name, output.dtype, tuple(output.shape), offset, offset + size))
        offset += size
    header = {"__metadata__": METADATA}
    for e in entries:
        header[e.name] = {"dtype": code_of(e.dtype), "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, entries


class PlannedFile:
    """A safetensors file being written: header and offsets planned from the outputs' shapes, the
    header written at once, each tensor written at its planned offset (os.pwrite) whenever it is
    ready, in any order. Every write returns what it wrote, (offset, bytes), for a FileHash.
    """

    def __init__(self, path: Path, outputs: list):
        header, entries = plan(outputs)
        self.path, self.entries, self.start = path, {e.name: e for e in entries}, len(header)
        self.size = len(header) + max((e.end for e in entries), default=0)
        self.remaining = len(entries)  # tensors not yet written
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.header = (0, memoryview(header))
        try:
            write_at(self.fd, *self.header)
        except BaseException:
            self.close(sync=False)
            raise

    def put(self, name: str, tensor) -> tuple:
        """Write one planned tensor; returns (offset, bytes written), a view of the tensor's memory.

        Raises ValueError when the tensor's dtype or shape differs from its planned output.
        """
        import torch

        entry = self.entries[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {entry.dtype} {entry.shape}")
        piece = (self.start + entry.begin, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        write_at(self.fd, *piece)
        self.remaining -= 1
        return piece

    def close(self, sync: bool = True) -> None:
        """Flush to disk (unless abandoning it) and close; closing twice does nothing."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def write_at(fd: int, offset: int, data: memoryview) -> None:
    """All of data at offset (pwrite may write less than asked: large writes are split)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def write(path: Path, outputs: list, produce) -> None:
    """Write one file in its planned order; produce(name) returns each tensor when its turn comes.

    Raises ValueError when a produced tensor's dtype or shape differs from its planned output.
    """
    planned = PlannedFile(path, outputs)
    try:
        for name in planned.entries:  # in layout order
            planned.put(name, produce(name))
    except BaseException:
        planned.close(sync=False)
        raise
    planned.close()
