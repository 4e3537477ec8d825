"""Resolve a release: compose specs/ with Hydra, validate, return the canonical spec. Pure.

    builder resolve smollm2-135m-instruct-fp8-dynamic quant.ignore='[lm_head]' --json
"""

import json
import re
from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from builder.release import families, fit, memory
from builder.release.recipe import Recipe, problems as recipe_problems
from builder.errors import BuilderError, Problem
from builder.paths import SCHEMAS_DIR

GROUPS = ("model", "quant", "target", "parallelism", "context", "calibration", "eval")


def list_releases(root: Path) -> list:
    """Release names: the file names in specs/release/, sorted."""
    return sorted(p.stem for p in (root / "specs" / "release").glob("*.yaml"))


def resolve(root: Path, release: str, overrides: tuple = ()) -> dict:
    """The resolved, validated spec of one release, as plain data with sorted-key semantics.

    Raises BuilderError listing every problem, each naming its file and key.
    """
    spec = compose(root, release, tuple(overrides))
    problems = [locate(root, spec["choices"], overrides, path, message)
                for path, message in schema_problems(spec)]
    if not problems:
        problems = [locate(root, spec["choices"], overrides, path, message)
                    for path, message in semantic_problems(spec, quant_options(root))]
    if problems:
        raise BuilderError(problems)
    return spec


def compose(root: Path, release: str, overrides: tuple) -> dict:
    """Hydra composition of specs/config.yaml + release/<release>.yaml + overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    release_file = root / "specs" / "release" / f"{release}.yaml"
    if not release_file.is_file():
        known = ", ".join(list_releases(root)) or "none"
        raise BuilderError(Problem(f"specs/release/{release}.yaml", "", f"no such release; known: {known}"))
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
        raise BuilderError(Problem(where, "", message)) from None
    finally:
        GlobalHydra.instance().clear()
    spec["choices"] = {key: value for key, value in choices.items() if not key.startswith("hydra")}
    return spec


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


@cache
def schema(name: str) -> Draft202012Validator:
    document = json.loads((SCHEMAS_DIR / name).read_text())
    Draft202012Validator.check_schema(document)
    return Draft202012Validator(document)


def schema_problems(document: dict, name: str = "release.schema.json") -> list:
    """(key path, message) for every schema violation, in key order."""
    found = []
    for error in schema(name).iter_errors(document):
        found.extend(explain(error))
    return sorted(set(found))


def explain(error) -> list:
    """One readable (path, message) per leaf jsonschema error."""
    path = tuple(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return [((*path, key), f"unknown key; allowed keys: {', '.join(allowed)}") for key in extra]
    if error.validator in ("oneOf", "anyOf") and error.context:
        # the branch that matched best says what is wrong; nulls are always allowed alternatives
        branches = [e for e in error.context if e.validator != "type" or e.validator_value != "null"]
        deepest = max(branches or error.context, key=lambda e: len(e.absolute_path))
        return explain(deepest)
    if error.validator == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return [(path, f"{json.dumps(error.instance)} is not allowed; allowed: {allowed}")]
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return [((*path, key), "missing required key") for key in missing] or [(path, error.message)]
    shown = json.dumps(error.instance) if is_scalar(error.instance) else "value"
    if error.validator == "type":
        return [(path, f"{shown}: expected {error.validator_value}")]
    if error.validator == "pattern":
        return [(path, f"{shown}: {error.schema.get('description') or 'must match ' + error.validator_value}")]
    return [(path, f"{shown}: {error.message}")]


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def quant_options(root: Path) -> dict:
    """name -> Recipe of every complete option in specs/quant/ (for naming what a target takes)."""
    found = {}
    for path in sorted((root / "specs" / "quant").glob("*.yaml")):
        try:
            found[path.stem] = Recipe.of(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, KeyError, TypeError):
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
    family_problems = model_problems(spec)
    if family_problems:  # without a known family nothing can be planned for the model
        return found + family_problems
    recipe = Recipe.of(spec["quant"])
    inconsistent = recipe_problems(recipe) + group_problems(spec["model"]["architecture"], recipe)
    inconsistent += smoothing_problems(spec["model"]["architecture"], recipe)
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


def model_problems(spec: dict) -> list:
    """The architecture is one the builder supports, declared as its family needs it."""
    arch = spec["model"]["architecture"]
    family = families.of_class(arch["class"])
    if family is None:
        return [(("model", "architecture", "class"), f"{arch['class']} is not a supported architecture; "
                 f"supported: {families.supported()} (docs/architecture.md says how to add a family)")]
    found = []
    if (family.moe is None) != (arch.get("moe") is None):
        found.append((("model", "architecture", "moe"), f"{arch['class']} is "
                      f"{'a mixture of experts: declare moe' if family.moe else 'dense: moe is not allowed'} "
                      "(builder model add writes it from config.json)"))
    if family.tied_only and not arch["tie_word_embeddings"] and spec["target"]["runtime"] == "vllm":
        found.append((("model", "architecture", "tie_word_embeddings"), f"false: vLLM loads {arch['class']} "
                      "only with a tied lm_head"))
    return found + families.layout_problems(arch, family, spec["quant"]["format"])


def smoothing_problems(arch: dict, recipe: Recipe) -> list:
    """SmoothQuant or AWQ-style scaling asked of a family they cannot fold into (families.smoothable)."""
    family = families.of_class(arch["class"])
    asked = [(key, name) for key, name, value in (("smoothing", "SmoothQuant", recipe.smoothing),
                                                 ("awq", "AWQ-style scaling", recipe.awq)) if value is not None]
    if not asked or families.smoothable(family):
        return []
    supported = ", ".join(f.model_type for f in families.FAMILIES.values() if families.smoothable(f))
    return [(("quant", key), f"{name} folds into two norms per layer that scale by their weight; "
             f"{arch['class']} has {'experts' if family.moe else 'other norms'}: supported for {supported}")
            for key, name in asked]


def group_problems(arch: dict, recipe: Recipe) -> list:
    """Group sizes that do not divide a targeted layer's input features, naming the layer."""
    args = recipe.weights
    if args is None or args.strategy != "group":
        return []
    found = {}
    for module, _, columns in memory.linear_layers(arch):
        if recipe.quantizes(module) and columns % args.group_size:
            name = re.sub(r"\.experts\.\d+\.", ".experts.*.", re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", module))
            found[name] = ((("quant", "weights", "group_size"), f"{args.group_size} does not divide the "
                            f"{columns} input features of {name}; use a divisor of {columns}"))
    return list(found.values())


def locate(root: Path, choices: dict, overrides, path: tuple, message: str) -> Problem:
    """Name the file that set the key at path: an override, the release file or a group file."""
    dotted = ".".join(path)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in GROUPS and path and key == path[0] and len(path) > 1:  # the override chose a group file
            return Problem(f"specs/{key}/{choices[key]}.yaml (chosen by override {override!r})", dotted, message)
        if key and (dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")):
            return Problem(f"override {override!r}", dotted, message)
    release_file = f"specs/release/{choices['release']}.yaml"
    if sets_key(root / release_file, path) or not path or path[0] not in GROUPS:
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
