"""Full weights from base + delta (MLC LLM's delta checkpoints), streamed one tensor at a time.

    builder import vicuna-7b      # a model whose source is {kind: delta, base: llama-7b, ...}
"""

import shutil
from pathlib import Path

from builder import tensorfile
from builder.errors import BuilderError, Problem
from builder.source.load import tensor_index, weight_files
from builder.tensorfile import Output, read_header, torch_dtype


def merged(base, delta):
    """base + delta, added in float32 and cast to the delta's dtype; non-float tensors come from the delta."""
    import torch

    if not delta.is_floating_point():
        return delta
    return (base.to(torch.float32) + delta.to(torch.float32)).to(delta.dtype)


def mismatches(base: dict, delta_header: dict, file: str) -> list:
    """Problems with tensors the delta has that the base lacks or holds in another shape."""
    found = []
    for name, info in sorted(delta_header.items()):
        if name not in base:
            found.append(Problem(file, name, "in the delta but not in the base"))
        elif tuple(info["shape"]) != base[name].shape:
            found.append(Problem(file, name, f"delta shape {info['shape']} differs from the base's "
                                 f"{list(base[name].shape)}"))
    return found


def apply_delta(base: Path, delta: Path, out: Path) -> None:
    """Write out/ = base + delta in the delta's file layout (same shard names), plus the delta's other files.

    Only one tensor of each is in memory at a time (plain reads, no memory map).
    """
    base_tensors = tensor_index(base)
    files = weight_files(delta)
    headers = {file: read_header(file) for file in files}
    problems = [p for file, header in headers.items() for p in mismatches(base_tensors, header, file.name)]
    in_delta = {name for header in headers.values() for name in header}
    problems += [Problem(delta.name, name, "in the base but not in the delta")
                 for name in sorted(set(base_tensors) - in_delta)]
    if problems:
        raise BuilderError(problems)
    out.mkdir(parents=True, exist_ok=True)
    delta_tensors = tensor_index(delta)
    with tensorfile.reader(base_tensors) as read_base, tensorfile.reader(delta_tensors) as read_delta:
        for file, header in headers.items():
            outputs = [Output(name, torch_dtype(info["dtype"]), tuple(info["shape"])) for name, info in header.items()]
            tensorfile.write(out / file.name, outputs, lambda name: merged(read_base(name), read_delta(name)))
    for path in sorted(p for p in delta.rglob("*") if p.is_file() and p.suffix != ".safetensors"):
        relative = path.relative_to(delta)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / relative)
