"""The artifact describes itself: release.json, serve.json and the README.md model card."""

import json

import yaml

from builder import build as build_module
from builder.release import lock
from builder.artifact.card import model_card
from builder.artifact.release_files import write_release_files
from builder.artifact.serve import serve_config
from conftest import PROJECT


def test_artifact_holds_serve_json_and_a_model_card_listed_in_its_manifest(tiny_repo, tmp_path):
    manifest = build_module.build(tiny_repo.root, "tiny-qwen2-fp8-dynamic", out=tmp_path / "a",
                                  log=lambda message: None)
    release = lock.locked(tiny_repo.root, "tiny-qwen2-fp8-dynamic")
    assert {"serve.json", "README.md", "release.json"} <= {row["path"] for row in manifest["files"]}
    assert json.loads((tmp_path / "a" / "serve.json").read_text()) == serve_config(release)
    card = (tmp_path / "a" / "README.md").read_text()
    assert card == model_card(release)
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "test/tiny-qwen2"


def test_model_card_shows_eval_json_when_the_artifact_holds_one(tmp_path):
    release = lock.committed(PROJECT, "smollm2-135m-instruct-fp8-dynamic")
    (tmp_path / "eval.json").write_text(json.dumps({"kl": {"mean": 0.002}, "perplexity": {"increase_pct": 0.8}}))
    write_release_files(tmp_path, release)
    card = (tmp_path / "README.md").read_text()
    assert "| kl.mean | 0.002 |\n| perplexity.increase_pct | 0.8 |" in card
    assert json.loads((tmp_path / "release.json").read_text()) == lock.read(PROJECT, release.name)["spec"]

