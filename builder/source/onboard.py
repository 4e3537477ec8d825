"""Onboard a checkpoint: `builder model add NAME PATH` checks a local checkpoint folder as a build will,
then writes specs/model/NAME.yaml with its digest and the architecture facts of its config.json.

    builder model add qwen3-8b ~/downloads/Qwen3-8B      # copies it into weights/qwen3-8b/
    builder model add qwen3-8b weights/qwen3-8b           # already inside the repository: used in place
    builder model add qwen3-8b-fp8 ~/downloads/Qwen3-8B-FP8  # quantized: kept in weights/qwen3-8b-fp8-quantized/,
                                                          # dequantized into weights/qwen3-8b-fp8/
"""

import fnmatch
import re
import shutil
from pathlib import Path

import yaml

from builder import atomic
from builder.canonical import tree_digest
from builder.console import progress
from builder.errors import BuilderError, Problem
from builder.source import checks, dequantize, load
from builder.release import families
from builder.release.recipe import Recipe

# What a checkpoint folder may bring into weights/: weights as safetensors, configs, tokenizers, templates.
CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def add_model(root: Path, name: str, path: Path, model_id: str | None = None, license_id: str | None = None,
              force: bool = False, log=print) -> Path:
    """Check the checkpoint at path, put it at weights/NAME (unless it is inside the repository already)
    and write specs/model/NAME.yaml; returns the spec file. Nothing is written when a check fails."""
    spec_file = root / "specs" / "model" / f"{name}.yaml"
    relative = f"specs/model/{name}.yaml"
    problems = name_problems(root, name, relative, force)
    source = path.expanduser().resolve()
    if not source.is_dir():
        problems.append(Problem(str(path), "", "no such checkpoint folder"))
    if problems:
        raise BuilderError(problems)
    config = load.read_config(source, str(path))
    if dequantize.quantization(config):
        found = add_quantized(root, name, source, str(path), config, log)
    else:
        found = add_plain(root, name, source, str(path), log)
    spec = {"id": model_id or hub_id(source, name), "license": license_id or card_license(source) or "other",
            **found}
    atomic.write_text(spec_file, header(name, path, spec) + yaml.safe_dump(spec, sort_keys=False))
    log(f"wrote {relative}: {spec['architecture']['class']}, digest {spec['digest']}")
    log(next_steps(root, name, spec))
    return spec_file


def add_plain(root: Path, name: str, source: Path, shown: str, log) -> dict:
    """A floating checkpoint: checked, hashed (weights checked finite on the way), copied into weights/NAME
    unless it is in the repository already. Returns the spec's source, path, digest and architecture."""
    facts = checked(source, shown)
    destination = source if source.is_relative_to(root.resolve()) else root / "weights" / name
    files = checkpoint_files(source, copied=destination != source)
    entries = checks.digest_entries(source, files, shown)  # one read: hashed, every weight checked finite
    if destination != source:
        copy_checkpoint(root, source, destination, files, log)
    return {"source": {"kind": "local"}, "path": destination.relative_to(root.resolve()).as_posix(),
            "digest": tree_digest(entries), "architecture": facts}


def add_quantized(root: Path, name: str, source: Path, shown: str, config: dict, log) -> dict:
    """A checkpoint published quantized: kept as it is (weights/NAME-quantized/ unless it is in the repository
    already), dequantized into weights/NAME/ (builder/source/dequantize.py), and the dequantized folder checked
    as a plain source. Both digests are pinned; nothing is written when a check fails."""
    problems = dequantize.unreadable(config, shown)
    destination = root.resolve() / "weights" / name
    kept = source if source.is_relative_to(root.resolve()) else destination.with_name(f"{name}-quantized")
    if kept == destination:
        problems.append(Problem(shown, "", f"weights/{name}/ is where the dequantized checkpoint goes; move the "
                                f"quantized one to weights/{name}-quantized/ (or outside the repository) first"))
    if problems:
        raise BuilderError(problems)
    files = checkpoint_files(source, copied=kept != source)
    kept_digest = tree_digest(checks.digest_entries(source, files, shown))
    log(f"{shown}: {dequantize.source_format(config)}; dequantizing into weights/{name}/")
    with atomic.staging(destination, root) as staging:
        dequantize.dequantize_checkpoint(source, staging)
        facts = checked(staging, shown)
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        entries = checks.digest_entries(staging, written, f"weights/{name}")
        if kept != source:
            copy_checkpoint(root, source, kept, files, log)
        atomic.publish(staging, destination)
    return {"source": {"kind": "quantized", "path": kept.relative_to(root.resolve()).as_posix(),
                       "digest": kept_digest},
            "path": f"weights/{name}", "digest": tree_digest(entries), "architecture": facts}


def name_problems(root: Path, name: str, relative: str, force: bool) -> list:
    problems = []
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        problems.append(Problem(relative, "NAME", f"{name!r}: lower-case letters, digits, '.', '_' and '-', "
                                "starting with a letter or digit"))
    if (root / relative).exists() and not force:
        problems.append(Problem(relative, "", "exists; choose another name or pass --force to replace it"))
    return problems


def checked(folder: Path, shown: str) -> dict:
    """Everything a build will check of a source, now: safetensors only, readable headers, floating
    weights matching the architecture, a tokenizer, a supported family; and more (builder/source/checks.py):
    model_type agrees with architectures, the tokenizer loads and fits the embedding. Returns the
    architecture facts. (Finite weights are checked with the digest, in add_model.)"""
    config = load.read_config(folder, shown)
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in load.PICKLE_SUFFIXES)
    if pickles and not list(folder.glob("*.safetensors")):
        raise BuilderError(Problem(shown, "", f"only pickle weights ({', '.join(pickles[:3])}); convert them to "
                                   "safetensors first (they can run code when loaded, so the builder never reads them)"))
    problems = checks.label_problems(config, shown)
    if problems:
        raise BuilderError(problems)
    cls = (config.get("architectures") or [None])[0]
    if families.of_class(cls) is None:
        raise BuilderError(unsupported(shown, cls, "it is not a decoder-only *ForCausalLM"))
    load.check_tokenizer(folder, shown)
    tensors = load.tensor_index(folder)
    try:
        architecture = load.architecture(folder)
    except (ValueError, KeyError, AttributeError, TypeError) as error:  # transformers cannot build it
        raise BuilderError(unsupported(shown, cls, f"transformers cannot build it ({str(error).splitlines()[0]})"))
    if not architecture["supported"]:
        raise BuilderError(unsupported(shown, cls, "its model has no decoder layers (model.layers) to calibrate"))
    architecture = load.with_mtp(architecture, tensors, shown)
    load.check_tensors(shown, tensors, architecture["shapes"], architecture["tied"])
    problems = checks.tokenizer_problems(folder, config, shown)
    if problems:
        raise BuilderError(problems)
    return architecture["facts"]


def unsupported(shown: str, cls, why: str) -> Problem:
    return Problem(f"{shown}/config.json", "architectures", f"{cls} is not a supported architecture ({why}); "
                   f"supported: any decoder-only *ForCausalLM transformers builds, the families with a row "
                   f"({families.supported()}) and the others; docs/models.md, \"Adding a family\", says how "
                   "to add one")


def checkpoint_files(source: Path, copied: bool) -> list:
    """The relative paths of the files the model's folder will hold: every file when it is used in
    place, the safe ones (never pickles or code) when it is copied into weights/."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if copied:
        files = [p for p in files if any(fnmatch.fnmatch(p.name, pattern) for pattern in CHECKPOINT_FILES)]
    return [p.relative_to(source).as_posix() for p in files]


def copy_checkpoint(root: Path, source: Path, destination: Path, files: list, log) -> None:
    """Copy files (relative paths under source) into destination, atomically."""
    log(f"copying {len(files)} files ({sum((source / f).stat().st_size for f in files) / 1e9:.2f} GB) into "
        f"{destination.relative_to(root).as_posix()}/")
    with atomic.staging(destination, root) as staging:
        for relative in progress(files, desc="copy", unit="file"):
            path, target = source / relative, staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # follows a snapshot's links to the cache's blobs
        atomic.publish(staging, destination)


def hub_id(folder: Path, name: str) -> str:
    """The Hugging Face id a snapshot was downloaded from, when its path says (models--org--name)."""
    for part in reversed(folder.parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return name


def card_license(folder: Path) -> str | None:
    """The license in the checkpoint's model card front matter (README.md), if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        matter = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = matter.get("license") if isinstance(matter, dict) else None
    return str(value) if value else None


def header(name: str, path: Path, spec: dict) -> str:
    return (f"# {name}: written by `builder model add {name} {path}` from {spec['path']}/config.json.\n"
            "# Review id and license; the architecture block is what config.json means, the digest pins every\n"
            "# file of the folder (a build refuses any other bytes). Rerun `builder model add --force` after\n"
            "# replacing the checkpoint.\n")


def next_steps(root: Path, name: str, spec: dict) -> str:
    """The commands that take the new model to one built release (of the first recipe of FIRST_RECIPES the
    model takes), and build nothing else."""
    quant = first_recipe(root, spec["architecture"])
    release = f"{name}-{quant}"
    tracked = spec["source"].get("path", spec["path"])  # a quantized source is tracked; import remakes path
    return (f"next:\n  dvc add {tracked} && git add {tracked}.dvc specs/model/{name}.yaml\n"
            f"  write specs/release/{release}.yaml (# @package _global_, defaults: override /model: {name}, "
            f"override /quant: {quant}, ...; docs/models.md has one), then build only that release:\n"
            f"  builder lock && dvc repro build@{release}")


# The recipe a new model's first release is suggested with: the first of these that its family takes
# (gpt-oss's experts quantize only into its own MXFP4 or, one per expert, into weight-only integers; bf16
# always builds).
FIRST_RECIPES = ("fp8-dynamic", "gpt-oss-mxfp4", "bf16")


def first_recipe(root: Path, arch: dict) -> str:
    """The first of FIRST_RECIPES (shipped under root's specs/quant/) that no fact of the model's family refuses."""
    family = families.of_class(arch["class"])
    for quant in FIRST_RECIPES[:-1]:
        path = root / "specs" / "quant" / f"{quant}.yaml"
        recipe = Recipe.of(yaml.safe_load(path.read_text(encoding="utf-8"))) if path.is_file() else None
        if recipe is not None and not families.fact_problems(arch, recipe) \
                and not families.layout_problems(arch, family, recipe.format):
            return quant
    return FIRST_RECIPES[-1]
