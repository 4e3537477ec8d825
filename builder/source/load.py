"""Check and index a source checkpoint: pinned digest, safetensors only, the declared architecture."""

import json
import re
from pathlib import Path

from builder.canonical import file_entries, tree_digest
from builder.errors import BuilderError, Problem
from builder.paths import inside
from builder.tensorfile import index_of

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
SOURCE_DTYPES = ("BF16", "F16", "F32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def source_dir(root: Path, spec: dict) -> Path:
    """The source checkpoint folder, checked against the spec's pinned digest before any work."""
    path, digest = source_folder(root, spec)
    digest.check()
    return path


def source_folder(root: Path, spec: dict) -> tuple:
    """(the source checkpoint folder, its StreamedDigest): the folder checked (inside the repository,
    no pickles) but not yet read; the digest is checked as the build reads it (digest.check())."""
    from builder.source.digest import StreamedDigest

    model_file = f"specs/model/{spec['choices']['model']}.yaml"
    relative, pinned = spec["model"]["path"], spec["model"]["digest"]
    path = checked_folder(root, relative, model_file, "model.path",
                          f"import it first: builder import {spec['choices']['model']}")
    return path, StreamedDigest(path, pinned, lambda actual: refusal(model_file, "model.digest", relative,
                                                                     actual, pinned))


def pinned_folder(root: Path, relative: str, digest: str, file: str, path_key: str, digest_key: str,
                  missing_hint: str) -> Path:
    """A folder inside the repository, without pickles, whose tree digest is the pinned one."""
    path = checked_folder(root, relative, file, path_key, missing_hint)
    actual = tree_digest(file_entries(path))
    if actual != digest:
        raise BuilderError(refusal(file, digest_key, relative, actual, digest))
    return path


def checked_folder(root: Path, relative: str, file: str, path_key: str, missing_hint: str) -> Path:
    """A folder inside the repository (links included) without pickle files; its bytes are not read."""
    path = inside(root, relative, file=file, key=path_key)
    if not path.is_dir():
        raise BuilderError(Problem(file, path_key, f"{relative!r} does not exist; {missing_hint}"))
    for link in (p for p in path.rglob("*") if p.is_symlink()):
        inside(root, str(link.relative_to(root)), file=file, key=path_key)
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BuilderError(Problem(file, path_key, f"pickle weight files are refused "
                                   f"(they can run code when loaded): {', '.join(pickles)}"))
    return path


def refusal(file: str, key: str, relative: str, actual: str, pinned: str) -> Problem:
    """The error of a source folder whose digest is not the pinned one."""
    return Problem(file, key, f"{relative} has digest {actual}, but the spec pins {pinned}; "
                   "refusing a source that is not the pinned one")


def read_config(path: Path, model_file: str) -> dict:
    """config.json of a source checkpoint; refuses remote code."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BuilderError(Problem(model_file, "model.path", f"config.json is missing or unreadable ({error})")) from None
    if config.get("auto_map"):
        raise BuilderError(Problem(model_file, "model.path", "config.json asks for remote code "
                                   "(auto_map); trust_remote_code is not supported"))
    return config


def check_architecture(declared: dict, facts: dict, model_file: str) -> None:
    """The spec's architecture block against what config.json means (families.facts): each declared key
    must hold config.json's value, defaults and derived values included (head_dim = hidden / heads)."""
    problems = []
    for key, value in sorted(declared.items()):
        actual = facts.get(key, False if isinstance(value, bool) else None)
        if actual != value:
            problems.append(Problem(model_file, f"model.architecture.{key}",
                                    f"{value!r} declared, but config.json means {actual!r}"))
    for key in sorted(set(facts) - set(declared)):
        if key == "moe":  # a MoE model declared as dense would be estimated and checked without its experts
            problems.append(Problem(model_file, "model.architecture.moe", f"missing: config.json declares experts "
                                    f"{facts['moe']}; run `builder model add` again or copy it"))
    if problems:
        raise BuilderError(problems)


def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint, from its index when it has one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BuilderError(Problem(str(path.name), "", "no *.safetensors weight files"))
    return files


def tensor_index(path: Path) -> dict:
    """tensor name -> tensorfile.StoredTensor (file, dtype code, shape) across every shard of the checkpoint."""
    return index_of(weight_files(path))


def architecture(config_dir: Path) -> dict:
    """What transformers makes of config.json: {modules: name -> class, shapes: parameter -> shape,
    tied: parameter names, facts: the architecture block (families.facts), supported: bool}, all
    named as in the checkpoint (builder/source/skeleton.py). Remembered per config.json (builder.release.cache):
    a build that does not calibrate then never imports transformers' model code (~3 s, ~120 MB)."""
    from builder.release import cache

    found = cache.architecture(config_dir / "config.json", lambda: meta_architecture(config_dir))
    return {**found, "shapes": {name: tuple(shape) for name, shape in found["shapes"].items()},
            "tied": set(found["tied"])}


def meta_architecture(config_dir: Path) -> dict:
    """The model built on the meta device (no memory), as JSON data (see architecture())."""
    from builder.source import skeleton

    config, family, model = skeleton.build(config_dir)
    named = dict(model.named_parameters(remove_duplicate=False))
    untied = {name for name, _ in model.named_parameters()}

    def disk(name):
        return skeleton.checkpoint_name(name, family)

    return {"modules": {disk(name): type(module).__name__ for name, module in model.named_modules() if name},
            "shapes": {disk(name): list(parameter.shape) for name, parameter in named.items()},
            "tied": sorted(disk(name) for name in set(named) - untied),
            "facts": skeleton.facts(config, family, model), "supported": family is not None,
            "mtp": skeleton.mtp_rows(config, family, model)}


def with_mtp(architecture: dict, tensors: dict, folder: str) -> dict:
    """The architecture with the multi-token-prediction layers the checkpoint holds (architecture()'s `mtp`):
    their shapes among those checked, and in the facts' checkpoint (role mtp: passed through in the output
    dtype; mtp_linear: the same, named in ignore). A config may declare them while the files leave them
    out (transformers and llm-compressor save none): then nothing changes. A layer held in part is refused."""
    rows = architecture.get("mtp") or []
    held = [row for row in rows if row[0] in tensors]
    if not held:
        return architecture
    repeated = (".embed_tokens.weight", ".shared_head.head.weight")  # copies of the model's own (optional)
    missing = sorted(name for name, _, _ in rows if name not in tensors and not name.endswith(repeated))
    if missing:
        raise BuilderError([Problem(folder, name, "missing from the checkpoint: a multi-token-prediction layer "
                                    "is kept whole or left out (num_nextn_predict_layers)") for name in missing])
    shapes = {**architecture["shapes"], **{name: tuple(shape) for name, shape, _ in held}}
    facts = dict(architecture["facts"])
    if facts.get("checkpoint") is not None:
        facts["checkpoint"] = facts["checkpoint"] + grouped(held)
    return {**architecture, "shapes": shapes, "facts": facts}


def grouped(rows: list) -> list:
    """[name, shape, role] rows as the architecture block's checkpoint entries: {layer} and {expert} for
    the layer and expert numbers (builder/release/families.py derived_tensors reads them back)."""
    entries = {}
    for name, shape, role in rows:
        layer, expert = re.match(r"model\.layers\.(\d+)\.", name), re.search(r"\.experts\.(\d+)\.", name)
        template = re.sub(r"\.experts\.\d+\.", ".experts.{expert}.", re.sub(r"^model\.layers\.\d+\.",
                                                                           "model.layers.{layer}.", name))
        entry = entries.setdefault((template, tuple(shape), role), {"name": template, "shape": list(shape),
                                                                     "role": role, "layers": []})
        if layer and int(layer.group(1)) not in entry["layers"]:
            entry["layers"].append(int(layer.group(1)))
        if expert:
            entry["experts"] = max(entry.get("experts", 0), int(expert.group(1)) + 1)
    return list(entries.values())


def check_tensors(folder: str, tensors: dict, shapes: dict, tied: set) -> None:
    """Every parameter present with its shape and a floating dtype; nothing the model lacks."""
    fused = sorted(name for name in tensors if name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
                   and name not in shapes)  # the model's own layout (Llama 4, gpt-oss) is no refusal
    if fused:  # transformers' in-memory layout: vLLM, llm-compressor and we read one tensor per expert
        raise BuilderError(Problem(folder, fused[0], f"experts stored fused ({len(fused)} tensors like this); "
                                   "save the checkpoint with one tensor per expert, as transformers' "
                                   "save_pretrained and the Hugging Face hub do"))
    problems = []
    for name in sorted(set(shapes) - set(tensors) - tied):
        problems.append(Problem(folder, name, "missing from the checkpoint (partial weights?)"))
    for name in sorted(set(tensors) - set(shapes)):
        problems.append(Problem(folder, name, "not a parameter of the model's architecture"))
    for name in sorted(set(tensors) & set(shapes)):
        stored = tensors[name]
        if stored.shape != shapes[name]:
            problems.append(Problem(folder, name, f"shape {list(stored.shape)}, the architecture needs "
                                    f"{list(shapes[name])}"))
        if stored.dtype not in SOURCE_DTYPES:
            problems.append(Problem(folder, name, f"dtype {stored.dtype}; source weights must be one of "
                                    f"{', '.join(SOURCE_DTYPES)} (not already quantized)"))
    if problems:
        raise BuilderError(problems)


def check_tokenizer(path: Path, folder: str) -> None:
    """An artifact is served with its tokenizer: refuse a source without one."""
    missing = [] if (path / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise BuilderError(Problem(folder, "", f"missing tokenizer files: {', '.join(missing)}"))
