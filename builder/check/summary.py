"""What an artifact holds: bytes per dtype, and per layer its tensors' dtypes, shapes and scale statistics.

    builder summary artifacts/smollm2-135m-instruct-w4a16 [--details] [--json]
"""

from pathlib import Path

from builder import formats
from builder.source.load import weight_files
from builder.tensorfile import nbytes, read_header, torch_dtype


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


def layers(headers: dict, scales: tuple) -> dict:
    """module -> {tensor suffix: {dtype, shape, and min/max/mean for scales}}, reading only scale
    tensors (scales: the suffixes of their names, the format's SCALES)."""
    from safetensors import safe_open

    found = {}
    for file, header in headers.items():
        with safe_open(file, framework="pt") as handle:
            for name, info in sorted(header.items()):
                module, _, suffix = name.rpartition(".")
                row = {"dtype": info["dtype"], "shape": info["shape"]}
                if scales and suffix.endswith(scales):
                    scale = handle.get_tensor(name).float()
                    row.update(min=float(scale.min()), max=float(scale.max()), mean=float(scale.mean()))
                found.setdefault(module, {})[suffix] = row
    return dict(sorted(found.items()))


def summarize(artifact: Path, details: bool = False) -> dict:
    """{"dtypes": bytes per dtype, "layers": per-module table (with details)}; a format with a
    container of its own summarises its file itself."""
    fmt, _ = formats.found_in(artifact)
    if fmt.CONTAINER != formats.SAFETENSORS:
        return fmt.summary(sorted(artifact.glob(f"*{fmt.CONTAINER}"))[0], details)
    headers = {file: read_header(file) for file in weight_files(artifact)}
    result = {"dtypes": by_dtype(headers)}
    if details:
        result["layers"] = layers(headers, fmt.SCALES)
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
