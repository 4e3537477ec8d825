"""Lock files: written from specs/, stable, and checked in CI."""

import json

import pytest

from builder.release import lock
from builder.errors import CheckFailed
from builder.release.resolve import list_releases
from conftest import PROJECT


def test_shipped_locks_and_params_are_current():
    lock.check(PROJECT)


def test_lock_writes_one_file_per_release_and_params(repo):
    result = repo.run("lock", check=0)
    written = sorted(line.split()[-1] for line in result.stdout.splitlines())
    assert written == sorted([f"locks/{release}.json" for release in list_releases(PROJECT)] + ["params.yaml"])
    entry = json.loads((repo.root / "locks" / "smollm2-135m-instruct-bf16.json").read_text())
    assert entry["artifact_id"].startswith("sha256:") and entry["spec"]["quant"]["format"] == "dense"
    assert repo.run("lock", "--check").returncode == 0
    assert repo.run("lock").stdout.strip() == "locks/ and params.yaml are up to date"


def test_lock_check_fails_naming_stale_removed_and_missing_locks(repo):
    repo.run("lock", check=0)
    fp8 = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    fp8.write_text(fp8.read_text().replace("ignore: [lm_head]", "ignore: [lm_head, re:.*down_proj]"))
    (repo.root / "locks" / "retired-release.json").write_text("{}")
    result = repo.run("lock", "--check")
    assert result.returncode == 1
    assert "locks/smollm2-135m-instruct-fp8-dynamic.json: stale" in result.stderr
    assert "locks/retired-release.json" in result.stderr
    assert "smollm2-135m-instruct-bf16.json" not in result.stderr
    repo.run("lock", check=0)
    assert not (repo.root / "locks" / "retired-release.json").exists()


def test_a_comment_edit_leaves_every_lock_byte_identical(repo):
    repo.run("lock", check=0)
    before = {p.name: p.read_bytes() for p in (repo.root / "locks").iterdir()}
    quant = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    quant.write_text("# reviewed by the release team\n" + quant.read_text())
    assert repo.run("lock").stdout.strip() == "locks/ and params.yaml are up to date"
    assert {p.name: p.read_bytes() for p in (repo.root / "locks").iterdir()} == before


def test_lock_writes_nothing_when_any_release_is_broken(repo):
    bad = repo.root / "specs" / "release" / "broken.yaml"
    bad.write_text("# @package _global_\nrelease:\n  name: broken\n  version: one\n")
    result = repo.run("lock")
    assert result.returncode == 2 and "specs/release/broken.yaml: release.version" in result.stderr
    assert not (repo.root / "locks").exists() and not (repo.root / "params.yaml").exists()


def test_lock_check_lists_the_stale_releases_and_what_changed_in_each(repo):
    repo.run("lock", check=0)
    releases = repo.root / "specs" / "release"
    bf16 = releases / "smollm2-135m-instruct-bf16.yaml"
    (releases / "smollm2-135m-instruct-bf16-v2.yaml").write_text(bf16.read_text().replace("-bf16\n", "-bf16-v2\n"))
    fp8 = releases / "smollm2-135m-instruct-fp8-dynamic.yaml"
    fp8.write_text(fp8.read_text().replace("1.0.0", "1.0.1"))
    with pytest.raises(CheckFailed) as failed:
        lock.check(repo.root)
    message = failed.value.render()
    assert "stale releases: smollm2-135m-instruct-bf16-v2, smollm2-135m-instruct-fp8-dynamic;" in message
    assert "release smollm2-135m-instruct-bf16-v2 is new and has no lock" in message
    assert "release smollm2-135m-instruct-fp8-dynamic changed (spec)" in message
    assert "params.yaml: stale" in message and failed.value.exit_code == 1


def test_params_name_the_models_to_import_and_every_releases_dependency_paths():
    import yaml

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    model = params["models"]["smollm2-135m-instruct"]
    assert model["path"] == "weights/smollm2-135m-instruct" and model["source"]["kind"] == "gguf"
    for release, paths in params["releases"].items():
        assert paths["lock"] == f"locks/{release}.json" and (PROJECT / paths["lock"]).is_file()
        assert paths["weights"] in {m["path"] for m in params["models"].values()}
        spec = json.loads((PROJECT / paths["lock"]).read_text())["spec"]
        for group in ("calibration", "eval"):  # a data file, or (no data) the lock fills the slot
            assert paths[group] == (spec[group]["dataset"] or paths["lock"])


def test_resolution_cache_is_keyed_by_every_spec_byte_and_never_changes_a_lock(repo, tmp_path, monkeypatch):
    from builder.release.lock import lock_entry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    release = "smollm2-135m-instruct-fp8-dynamic"
    cold = lock_entry(repo.root, release)
    stored = list((tmp_path / "cache").rglob("*.json"))
    assert len(stored) == 1
    assert lock_entry(repo.root, release) == cold  # served from the cache
    quant = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    quant.write_text("# a comment: new bytes, same spec\n" + quant.read_text())
    assert lock_entry(repo.root, release) == cold
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2  # a miss, resolved afresh
    quant.write_text(quant.read_text().replace("ignore: [lm_head]", "ignore: [lm_head, re:.*down_proj]"))
    changed = lock_entry(repo.root, release)
    assert changed["artifact_id"] != cold["artifact_id"]
    monkeypatch.setenv("BUILDER_CACHE", "off")
    assert lock_entry(repo.root, release) == changed


def test_architecture_cache_is_keyed_by_config_bytes_and_equals_what_transformers_builds(tmp_path, monkeypatch):
    import json

    from builder.source import load
    from conftest import make_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_checkpoint("tiny-qwen2", tmp_path / "model")
    fresh = load.meta_architecture(tmp_path / "model")
    cached = load.architecture(tmp_path / "model")
    assert cached == {**fresh, "shapes": {k: tuple(v) for k, v in fresh["shapes"].items()}, "tied": set(fresh["tied"])}
    assert cached["tied"] == {"lm_head.weight"}  # tiny-qwen2 ties its embeddings
    assert cached["facts"]["class"] == "Qwen2ForCausalLM" and cached["supported"]
    assert len(list((tmp_path / "cache" / "quant-release-builder" / "architecture").glob("*.json"))) == 1
    assert load.architecture(tmp_path / "model") == cached  # served from the cache
    config_file = tmp_path / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "intermediate_size": 96}))
    narrower = load.architecture(tmp_path / "model")["shapes"]
    assert cached["shapes"]["model.layers.1.mlp.up_proj.weight"] == (128, 64)
    assert narrower["model.layers.1.mlp.up_proj.weight"] == (96, 64)
