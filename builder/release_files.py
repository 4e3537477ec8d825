"""The artifact's own description of itself: release.json (the resolved spec)."""

from pathlib import Path

from builder.canonical import pretty_json


def write_release_files(out: Path, entry: dict) -> None:
    """release.json: the resolved spec, sorted keys, as the lock holds it."""
    (out / "release.json").write_text(pretty_json(entry["spec"]), encoding="utf-8")
