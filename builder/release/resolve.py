"""Resolve a release: compose specs/ with Hydra, validate, return the canonical spec. Pure.

    builder resolve smollm2-135m-instruct-fp8-dynamic quant.ignore='[lm_head]' --json
"""

import difflib
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from builder.errors import BuilderError, Problem
from builder.release import fit
from builder.release.catalog import defaults
from builder.release.models import GROUPS, Spec
from builder.release.recipe import Recipe, problems as recipe_problems
from builder.release.schema import validator as schema  # noqa: F401 (builder/source/importer.py reads it here)
from builder.release.validate import schema_at, typed


def list_releases(root: Path) -> list:
    """Release names: the file names in specs/release/, sorted."""
    return sorted(p.stem for p in (root / "specs" / "release").glob("*.yaml"))


def unknown_release(name: str, known: list) -> Problem:
    """The one error for a release name with no file: the nearest names first, then every known one."""
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return Problem(f"specs/release/{name}.yaml", "", f"no such release; {hint}known: {', '.join(known) or 'none'}")


def resolve(root: Path, release: str, overrides: tuple = ()) -> dict:
    """The resolved, validated spec of one release, as plain data with sorted-key semantics.

    Raises BuilderError listing every problem, each naming its file and key.
    """
    spec = compose(root, release, tuple(overrides))
    _, found = typed(spec)
    if not found:
        found = semantic_problems(spec, quant_options(root))
    if found:
        raise BuilderError([locate(root, spec["choices"], overrides, path, message) for path, message in found])
    return spec


def resolve_spec(root: Path, release: str, overrides: tuple = ()) -> Spec:
    """resolve(), typed: spec.quant.weights.num_bits, spec.target.device.kind, ... (spec.data(): the dict)."""
    return Spec.of(resolve(root, release, overrides))


def compose(root: Path, release: str, overrides: tuple) -> dict:
    """Hydra composition of specs/config.yaml + release/<release>.yaml + overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    release_file = root / "specs" / "release" / f"{release}.yaml"
    if not release_file.is_file():
        raise BuilderError(unknown_release(release, list_releases(root)))
    check_override_syntax(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str((root / "specs").resolve()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[f"+release={release}", *overrides],
                                return_hydra_config=True)
            choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
            spec = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
                    else cfg[key] for key in cfg if key != "hydra"}
    except Exception as error:  # Hydra and OmegaConf raise many types; all are input errors here
        message = hydra_message(error)
        culprit = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in message or o in message]
        where = f"override {culprit[0]!r}" if culprit else f"specs/release/{release}.yaml"
        problem = unknown_override(root, release, culprit[0], message) if culprit else None
        raise BuilderError(problem or Problem(where, "", message)) from None
    finally:
        GlobalHydra.instance().clear()
    spec["choices"] = {key: value for key, value in choices.items() if not key.startswith("hydra")}
    return spec


def unknown_override(root: Path, release: str, override: str, message: str) -> Problem | None:
    """Hydra's "Could not override 'a.b'. To append ... use +a.b=..." answered first with what the spec
    has there: the groups, a group's keys (and the file that chose it), or that a.b is a value. Hydra's
    hint, +a.b, is right only for a key the schema allows that the chosen files leave out."""
    found = re.match(r"Could not override '([^']+)'", message)
    if found is None:
        return None
    path, where = tuple(found.group(1).split(".")), f"override {override!r}"
    chosen = defaults(root / "specs" / "config.yaml") | defaults(root / "specs" / "release" / f"{release}.yaml")
    if path[0] in chosen:
        where += f" (specs/{path[0]}/{chosen[path[0]]}.yaml)"
    for depth in range(len(path)):
        node = schema_at(path[:depth], {})
        allowed = sorted(key for key in node.get("properties", {}) if depth or key != "choices")
        if depth and not allowed and not node.get("additionalProperties", False):
            return Problem(where, "", f"{'.'.join(path[:depth])} is a value, not a group: it has no key {path[depth]}")
        if allowed and path[depth] not in allowed:
            owner = {0: "the spec", 1: f"group {path[0]}"}.get(depth, ".".join(path[:depth]))
            noun = "group" if depth == 0 else "key"
            return Problem(where, "", f"{owner} has no {noun} {path[depth]}; its {noun}s: {', '.join(allowed)}")
    return Problem(where, ".".join(path), f"allowed, but no chosen spec file sets it: add it with +{override}")


def check_override_syntax(overrides: tuple) -> None:
    """Parse each override alone, so a syntax error names the override it is in."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, problems = OverridesParser.create(), []
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as error:  # Hydra's parser raises several types for bad syntax
            problems.append(Problem(f"override {override!r}", "", f"not Hydra override syntax "
                                    f"(key=value, +key=value, ~key, group=option): {hydra_message(error)}"))
    if problems:
        raise BuilderError(problems)


def hydra_message(error: Exception) -> str:
    """Hydra's message without its search-path dump (absolute paths, noise)."""
    text = str(error).split("\nConfig search path:")[0].split("\nSee https://hydra.cc")[0]
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip()) or type(error).__name__


def quant_options(root: Path) -> dict:
    """name -> Recipe of every complete option in specs/quant/ (for naming what a target takes)."""
    found = {}
    for path in sorted((root / "specs" / "quant").glob("*.yaml")):
        try:
            found[path.stem] = Recipe.of(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, ValidationError):
            continue  # a broken option is reported when a release chooses it
    return found


def semantic_problems(spec: dict, recipes: dict | None = None) -> list:
    """Choices that are each valid but do not fit together, as (key path, message).

    recipes: quant_options(), so that a target's refusal names the recipes it takes.
    """
    found = []
    if spec["release"]["name"] != spec["choices"]["release"]:
        found.append((("release", "name"), f"{spec['release']['name']!r} must equal the file name "
                      f"{spec['choices']['release']!r}"))
    family_problems = fit.model_problems(spec)
    if family_problems:  # without a known family nothing can be planned for the model
        return found + family_problems
    recipe, arch = Recipe.of(spec["quant"]), spec["model"]["architecture"]
    inconsistent = recipe_problems(recipe) + fit.group_size_problems(arch, recipe)
    inconsistent += fit.scaling_family_problems(arch, recipe)
    found.extend(inconsistent)
    if recipe.needs_calibration and spec["calibration"]["dataset"] is None:
        why = "imatrix's input importance" if recipe.algorithm == "imatrix" else \
            "static scales, KV-cache scales, GPTQ, imatrix_mse or SmoothQuant"
        found.append((("calibration", "dataset"), f"null, but the recipe calibrates ({why}); choose a "
                      "calibration group, e.g. calibration=licenses"))
    found.extend(fit.context_problems(spec))
    found.extend(fit.parallelism_problems(spec, recipe))
    if not inconsistent:  # the recipe's kernel family and size are only meaningful for a consistent recipe
        found.extend(fit.target_problems(spec, recipe, recipes))
        found.extend(fit.memory_problems(spec, recipe))
    return found


def locate(root: Path, choices: dict, overrides, path: tuple, message: str) -> Problem:
    """Name the file that set the key at path: an override, the release file or a group file."""
    dotted = ".".join(path)
    release_file = f"specs/release/{choices['release']}.yaml"
    in_release = sets_key(root / release_file, path)
    keys = [(override, override.split("=", 1)[0].lstrip("+~")) for override in overrides]
    chosen = [(override, key) for override, key in keys  # overrides that chose the key's group file
              if key in GROUPS and path and key == path[0] and len(path) > 1]
    for override, key in keys:  # a key set on the command line wins over every file
        if (override, key) not in chosen and key and (dotted == key or dotted.startswith(key + ".")
                                                      or key.startswith(dotted + ".")):
            return Problem(f"override {override!r}", dotted, message)
    for override, key in chosen:
        if not in_release:  # else the release file sets the key over the group's
            return Problem(f"specs/{key}/{choices[key]}.yaml (chosen by override {override!r})", dotted, message)
    if in_release or not path or path[0] not in GROUPS:
        return Problem(release_file, dotted, message)
    return Problem(f"specs/{path[0]}/{choices[path[0]]}.yaml", dotted, message)


def sets_key(file: Path, path: tuple) -> bool:
    """Whether a (global-package) YAML file sets the key path itself."""
    try:
        node = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
