"""What `builder list` shows of each release, read from its file without composing it (no Hydra). Pure.

    builder list            # release, recipe, target, description
    builder list --json

The description is the first sentence of the release file's header comment: a comment, so rewording it
changes no lock and rebuilds nothing (spec keys would enter the artifact_id).
"""

import re
from pathlib import Path

import yaml


def release_row(root: Path, name: str) -> dict:
    """One line about a release: the recipe and target it chooses (else specs/config.yaml's defaults)
    and its description."""
    text = (root / "specs" / "release" / f"{name}.yaml").read_text(encoding="utf-8")
    choices = defaults(root / "specs" / "config.yaml") | defaults(root / "specs" / "release" / f"{name}.yaml")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words = line.lstrip("#").strip()
        if words.startswith(("@package", "Build:")):
            continue
        header.append(words)
    sentence = re.split(r"(?<=\.)\s", " ".join(header), maxsplit=1)[0]
    return {"release": name, "recipe": choices.get("quant", "?"), "target": choices.get("target", "?"),
            "description": sentence}


def defaults(path: Path) -> dict:
    """The group choices of a Hydra file's defaults list (`group: option`, `override /group: option`)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    chosen = {}
    for item in document.get("defaults") or [] if isinstance(document, dict) else []:
        for key, value in (item.items() if isinstance(item, dict) else ()):
            group = key.removeprefix("override").strip().lstrip("/")
            if "/" not in group and isinstance(value, str):
                chosen[group] = value
    return chosen
