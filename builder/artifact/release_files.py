"""The artifact's own description of itself: release.json (resolved spec), serve.json, README.md (card)."""

import json
from pathlib import Path

from builder.artifact import card, serve
from builder.canonical import pretty_json
from builder.paths import CARD_FILE, EVAL_FILE, RELEASE_FILE, SERVE_FILE
from builder.release.release import Release


def write_release_files(out: Path, release: Release) -> None:
    """release.json, serve.json and the model card; the card shows eval.json when out holds one."""
    (out / RELEASE_FILE).write_text(pretty_json(release.spec.data()), encoding="utf-8")
    (out / SERVE_FILE).write_text(pretty_json(serve.serve_config(release)), encoding="utf-8")
    evaluation = out / EVAL_FILE
    result = json.loads(evaluation.read_text(encoding="utf-8")) if evaluation.is_file() else None
    (out / CARD_FILE).write_text(card.model_card(release, result), encoding="utf-8")
