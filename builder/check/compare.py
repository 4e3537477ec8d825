"""Compare an artifact with a rebuild of it, and say why this checkout could not promise the same bytes.

    builder verify --rebuild artifacts/smollm2-135m-instruct-fp8-dynamic    (builder/build.py: rebuild)
"""

from pathlib import Path

from builder import formats
from builder.check.verify import content_files
from builder.errors import BuilderError, Problem
from builder.release import identity, lock
from builder.release.release import Release
from builder.tensorfile import read_header


def input_problems(root: Path, release: Release, where: str) -> list:
    """Why this checkout cannot promise the recorded bytes: inputs (weights, data, toolchain, output
    versions) that differ from those recorded, or a record that does not hash to its artifact_id."""
    entry = release.to_entry()
    current = {**entry, "inputs": identity.inputs(root, entry["spec"])}
    problems = [Problem(where, name, f"recorded {old}, this checkout has {new}")
                for name, old, new in lock.differences(entry, current)]
    if not problems and not identity.holds(entry):
        problems.append(Problem(where, "artifact_id", "release.json and the inputs do not hash to it"))
    return problems


def first_difference(artifact: Path, rebuilt: Path) -> tuple | None:
    """(relative path, what differs) for the first content file, in path order, that differs; None if
    none does. provenance.json is not compared: it names the builder's code, which may differ."""
    have = {e["path"]: e for e in content_files(artifact)}
    want = {e["path"]: e for e in content_files(rebuilt)}
    for path in sorted(set(have) | set(want)):
        if path not in have:
            return path, "missing (the rebuild writes it)"
        if path not in want:
            return path, "extra file (the rebuild does not write it)"
        if have[path]["sha256"] != want[path]["sha256"]:
            detail = ""
            if path.endswith(formats.SAFETENSORS):
                detail = first_tensor_difference(artifact / path, rebuilt / path)
            for fmt in formats.FORMATS.values():  # a format's own container
                if fmt.CONTAINER != formats.SAFETENSORS and path.endswith(fmt.CONTAINER):
                    detail = fmt.difference(artifact / path, rebuilt / path)
            return path, f"differs from the rebuild: {have[path]['sha256']} != {want[path]['sha256']}{detail}"
    return None


def first_tensor_difference(have: Path, want: Path) -> str:
    """'; first differing tensor NAME (what)' for two safetensors files, comparing raw bytes by name."""
    try:
        headers = read_header(have), read_header(want)
    except BuilderError as error:
        return f"; {error.render()}"
    # read_header checked 8 + header + data == file size, so the data starts at size - data length
    starts = [path.stat().st_size - max((t["data_offsets"][1] for t in header.values()), default=0)
              for path, header in zip((have, want), headers)]
    with open(have, "rb") as first, open(want, "rb") as second:
        for name in sorted(set(headers[0]) | set(headers[1])):
            a, b = headers[0].get(name), headers[1].get(name)
            if a is None or b is None:
                return f"; tensor {name} is {'missing' if a is None else 'not in the rebuild'}"
            if (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
                return f"; tensor {name}: {a['dtype']}{a['shape']} != {b['dtype']}{b['shape']}"
            if tensor_bytes(first, starts[0], a) != tensor_bytes(second, starts[1], b):
                return f"; first differing tensor: {name}"
    return "; tensors equal (header or layout differs)"


def tensor_bytes(handle, data_start: int, info: dict) -> bytes:
    begin, end = info["data_offsets"]
    handle.seek(data_start + begin)
    return handle.read(end - begin)
