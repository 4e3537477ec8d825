"""Rebuild an artifact from its recorded inputs in a temporary folder and compare it file by file.

    builder verify --rebuild artifacts/smollm2-135m-instruct-fp8-dynamic
"""

import json
import tempfile
from pathlib import Path

from builder import identity, manifest
from builder.canonical import file_entries, tree_digest
from builder.errors import BuilderError, CheckFailed, Problem


def recorded_entry(artifact: Path) -> dict:
    """The lock entry an artifact was built from: release.json (spec) + the manifest's inputs."""
    try:
        recorded = manifest.read(artifact)
        spec = json.loads((artifact / "release.json").read_text(encoding="utf-8"))
        return {"schema": "builder.lock/v1", "release": recorded["release"], "overrides": recorded["overrides"],
                "artifact_id": recorded["artifact_id"], "spec": spec, "inputs": recorded["inputs"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BuilderError(Problem(str(artifact), "", f"cannot read the recorded inputs ({error})")) from None


def input_problems(root: Path, entry: dict, where: str) -> list:
    """Why this checkout cannot promise the recorded bytes: inputs that differ from those recorded."""
    current = identity.inputs(root, entry["spec"])
    problems = []
    for key in sorted(set(current) | set(entry["inputs"])):
        if current.get(key) != entry["inputs"].get(key):
            problems.append(Problem(where, f"inputs.{key}", f"recorded {entry['inputs'].get(key)}, "
                                    f"this checkout has {current.get(key)}"))
    if not problems and identity.artifact_id(entry["spec"], current) != entry["artifact_id"]:
        problems.append(Problem(where, "artifact_id", "release.json and the inputs do not hash to it"))
    return problems


def rebuild(root: Path, artifact: Path, log=print) -> dict:
    """Rebuild from the recorded inputs; raise CheckFailed naming the first differing file (and tensor)."""
    from builder.build import build_into, prepare

    entry = recorded_entry(artifact)
    problems = input_problems(root, entry, f"{artifact.name}/{manifest.NAME}")
    if problems:
        raise BuilderError(problems)
    source = prepare(root, entry)
    with tempfile.TemporaryDirectory(prefix="builder-rebuild-") as temporary:
        staging = Path(temporary) / artifact.name
        staging.mkdir()
        log(f"{artifact.name}: rebuilding {entry['artifact_id']} in a temporary folder")
        rebuilt = build_into(entry, source, staging, root, log)
        difference = first_difference(artifact, staging)
    present = tree_digest(file_entries(artifact, exclude=manifest.OUTSIDE_DIGEST))
    if difference:
        raise CheckFailed(Problem(f"{artifact.name}/{difference[0]}", "", difference[1] +
                                  f"; rebuilt content digest {rebuilt['content_digest']}, on disk {present}"))
    return {"artifact": artifact.name, "content_digest": rebuilt["content_digest"], "files": len(rebuilt["files"])}


def first_difference(artifact: Path, rebuilt: Path) -> tuple | None:
    """(relative path, what differs) for the first file, in path order, that differs; None if none does."""
    have = {e["path"]: e for e in file_entries(artifact, exclude=manifest.OUTSIDE_DIGEST)}
    want = {e["path"]: e for e in file_entries(rebuilt, exclude=manifest.OUTSIDE_DIGEST)}
    for path in sorted(set(have) | set(want)):
        if path not in have:
            return path, "missing (the rebuild writes it)"
        if path not in want:
            return path, "extra file (the rebuild does not write it)"
        if have[path]["sha256"] != want[path]["sha256"]:
            detail = ""
            if path.endswith(".safetensors"):
                detail = first_tensor_difference(artifact / path, rebuilt / path)
            return path, f"differs from the rebuild: {have[path]['sha256']} != {want[path]['sha256']}{detail}"
    return None


def first_tensor_difference(have: Path, want: Path) -> str:
    """'; first differing tensor NAME (what)' for two safetensors files, comparing raw bytes by name."""
    from builder.load import read_header

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
