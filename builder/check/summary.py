"""What an artifact holds: bytes per dtype, and per layer its tensors' dtypes, shapes and scale statistics.

    builder summary artifacts/smollm2-135m-instruct-w4a16 [--details] [--json]
"""

from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.source.load import weight_files
from builder.tensorfile import nbytes, read_header, torch_dtype

SCALE_SUFFIXES = ("_scale", "scales", "biases")  # weight_scale, input_scale, k_scale, v_scale; MLX's scales, biases


def by_dtype(headers: dict) -> dict:
    """dtype code -> {"tensors": count, "bytes": total}, with a "total" row."""
    rows = {}
    for header in headers.values():
        for info in header.values():
            row = rows.setdefault(info["dtype"], {"tensors": 0, "bytes": 0})
            row["tensors"] += 1
            row["bytes"] += nbytes(torch_dtype(info["dtype"]), tuple(info["shape"]))
    rows["total"] = {key: sum(row[key] for row in rows.values()) for key in ("tensors", "bytes")}
    return rows


def layers(headers: dict) -> dict:
    """module -> {tensor suffix: {dtype, shape, and min/max/mean for scales}}, reading only scale tensors."""
    from safetensors import safe_open

    found = {}
    for file, header in headers.items():
        with safe_open(file, framework="pt") as handle:
            for name, info in sorted(header.items()):
                module, _, suffix = name.rpartition(".")
                row = {"dtype": info["dtype"], "shape": info["shape"]}
                if suffix.endswith(SCALE_SUFFIXES):
                    scale = handle.get_tensor(name).float()
                    row.update(min=float(scale.min()), max=float(scale.max()), mean=float(scale.mean()))
                found.setdefault(module, {})[suffix] = row
    return dict(sorted(found.items()))


def gguf_summary(file: Path, details: bool) -> dict:
    """summarize() for a GGUF file: bytes per GGML type; per tensor its type, shape (torch order) and,
    for Q8_0 / Q4_0, the block scales' min/max/mean (each block's leading F16)."""
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
            if kind in ("Q8_0", "Q4_0"):
                scales = numpy.asarray(tensor.data).reshape(-1, block)[:, :2].copy().view(numpy.float16)
                entry.update(min=float(scales.min()), max=float(scales.max()), mean=float(scales.astype(numpy.float64).mean()))
            found.setdefault(module, {})[suffix] = entry
    rows["total"] = {key: sum(row[key] for row in rows.values()) for key in ("tensors", "bytes")}
    return {"dtypes": rows, **({"layers": dict(sorted(found.items()))} if details else {})}


def summarize(artifact: Path, details: bool = False) -> dict:
    """{"dtypes": bytes per dtype, "layers": per-module table (with details)}."""
    ggufs = sorted(artifact.glob("*.gguf"))
    if ggufs:
        return gguf_summary(ggufs[0], details)
    if not (artifact / "config.json").is_file():
        raise BuilderError(Problem(str(artifact), "", "not an artifact (no config.json or .gguf file)"))
    headers = {file: read_header(file) for file in weight_files(artifact)}
    result = {"dtypes": by_dtype(headers)}
    if details:
        result["layers"] = layers(headers)
    return result


def render(result: dict) -> str:
    """Markdown tables for people."""
    total = result["dtypes"]["total"]["bytes"] or 1
    lines = ["| dtype | tensors | bytes | share |", "|---|---:|---:|---:|"]
    for dtype, row in sorted(result["dtypes"].items(), key=lambda item: (item[0] == "total", item[0])):
        lines.append(f"| {dtype} | {row['tensors']} | {row['bytes']:,} | {100 * row['bytes'] / total:.1f} % |")
    if "layers" in result:
        lines += ["", "| module | tensor | dtype | shape | scale min | scale max | scale mean |",
                  "|---|---|---|---|---:|---:|---:|"]
        for module, tensors in result["layers"].items():
            for suffix, row in tensors.items():
                stats = [f"{row[k]:.4g}" if k in row else "" for k in ("min", "max", "mean")]
                lines.append(f"| {module} | {suffix} | {row['dtype']} | {row['shape']} | {' | '.join(stats)} |")
    return "\n".join(lines) + "\n"
