"""The artifact describes itself: release.json, serve.json and the README.md model card."""

import json

import pytest
import yaml

from builder import build as build_module, lock
from builder.card import model_card
from builder.release_files import write_release_files
from builder.serve import serve_config
from conftest import PROJECT


def test_artifact_holds_serve_json_and_a_model_card_listed_in_its_manifest(tiny_repo, tmp_path):
    manifest = build_module.build(tiny_repo.root, "tiny-qwen2-fp8-dynamic", out=tmp_path / "a",
                                  log=lambda message: None)
    entry = lock.lock_entry(tiny_repo.root, "tiny-qwen2-fp8-dynamic")
    assert {"serve.json", "README.md", "release.json"} <= {row["path"] for row in manifest["files"]}
    assert json.loads((tmp_path / "a" / "serve.json").read_text()) == serve_config(entry)
    card = (tmp_path / "a" / "README.md").read_text()
    assert card == model_card(entry)
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "test/tiny-qwen2"


def test_model_card_shows_eval_json_when_the_artifact_holds_one(tmp_path):
    entry = lock.read(PROJECT, "smollm2-135m-instruct-fp8-dynamic")
    (tmp_path / "eval.json").write_text(json.dumps({"kl": {"mean": 0.002}, "perplexity": {"increase_pct": 0.8}}))
    write_release_files(tmp_path, entry)
    card = (tmp_path / "README.md").read_text()
    assert "| kl.mean | 0.002 |\n| perplexity.increase_pct | 0.8 |" in card
    assert json.loads((tmp_path / "release.json").read_text()) == entry["spec"]


@pytest.mark.e2e
def test_smollm2_tp3_release_builds_with_its_serve_json_card_and_estimated_size(tmp_path):
    from builder.importer import import_model
    from builder.load import read_header
    from builder.memory import weight_bytes

    import_model(PROJECT, "smollm2-135m-instruct", log=lambda message: None)  # no-op when present
    release = "smollm2-135m-instruct-fp8-dynamic-l4-tp3"
    build_module.build(PROJECT, release, out=tmp_path / release, log=lambda message: None)
    entry = lock.read(PROJECT, release)
    serve = json.loads((tmp_path / release / "serve.json").read_text())
    assert serve == serve_config(entry) and serve["arguments"]["tensor_parallel_size"] == 3
    card = (tmp_path / release / "README.md").read_text()
    assert card == model_card(entry) and "vllm-l4" in yaml.safe_load(card.split("---\n")[1])["tags"]
    written = sum(t["data_offsets"][1] - t["data_offsets"][0]
                  for t in read_header(tmp_path / release / "model.safetensors").values())
    assert written == weight_bytes(entry["spec"]["model"]["architecture"], entry["spec"]["quant"])
