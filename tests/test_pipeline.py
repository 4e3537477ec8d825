"""The DVC pipeline (dvc.yaml + params.yaml): `dvc repro` rebuilds exactly what changed, bit for bit."""

import json
import subprocess
import sys

from builder.artifact import record
from builder.release import lock
from conftest import PIPELINE_RELEASES, Pipeline

BUILDS = {f"build@{release}" for release in PIPELINE_RELEASES}


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_a_fresh_repo_builds_every_release_and_a_second_repro_does_nothing(built_pipeline):
    assert built_pipeline.first_repro == BUILDS
    for release in PIPELINE_RELEASES:
        entry = lock.read(built_pipeline.root, release)
        assert record.read(built_pipeline.root / "artifacts" / release).manifest["artifact_id"] == entry["artifact_id"]
    assert built_pipeline.repro() == set()
    tracked = built_pipeline.git("ls-files").stdout.split()
    assert "dvc.lock" in tracked and "weights/tiny-llama.dvc" in tracked
    assert not [p for p in tracked if p.startswith("artifacts/") or p.startswith("weights/tiny-llama/")]


def test_repro_force_rebuilds_everything_and_leaves_dvc_lock_byte_identical(pipeline):
    before = (pipeline.root / "dvc.lock").read_bytes()
    assert pipeline.repro("--force") == BUILDS
    assert (pipeline.root / "dvc.lock").read_bytes() == before


def test_a_comment_in_a_spec_rebuilds_nothing(pipeline):
    for path in (pipeline.root / "specs" / "quant" / "fp8-dynamic.yaml",
                 pipeline.root / "specs" / "release" / "tiny-llama-bf16.yaml"):
        text = path.read_text().replace("\n\n", "\n\n# reviewed by the release team\n\n")
        text = text.replace("# module class names", "# class names of modules")
        path.write_text(text + "# end\n")
    assert lock.write(pipeline.root) == []
    assert pipeline.repro() == set()


def builder(pipeline, *args) -> "subprocess.CompletedProcess":
    """The repository's own copy of the builder (python -m builder from its root), as dvc runs it."""
    return pipeline.sh(sys.executable, "-m", "builder", *args, check=False)


def test_a_comment_or_docstring_edit_anywhere_in_builder_rebuilds_nothing(pipeline):
    code = sorted((pipeline.root / "builder").rglob("*.py"))
    for path in code:
        path.write_text(path.read_text() + "\n# reviewed; nothing here changes a byte\n")
    edit(pipeline.root / "builder" / "check" / "audit.py", "and whether each claim still holds",
         "and whether each of its claims still holds")
    checked = builder(pipeline, "lock", "--check")
    assert checked.returncode == 0, checked.stderr
    assert "Data and pipelines are up to date" in pipeline.dvc("status").stdout
    assert pipeline.repro() == set()


def test_bumping_an_output_version_makes_exactly_the_releases_that_run_it_stale(pipeline):
    edit(pipeline.root / "builder" / "release" / "identity.py", '"quantize.float": 1,', '"quantize.float": 2,')
    checked = builder(pipeline, "lock", "--check")
    assert checked.returncode == 1
    assert "stale releases: tiny-llama-fp8-dynamic, tiny-qwen2-fp8-dynamic;" in checked.stderr
    assert "inputs.versions (quantize.float 1 -> 2)" in checked.stderr
    plan = json.loads(builder(pipeline, "plan", "--base", "HEAD", "--json").stdout)
    assert [change["release"] for change in plan["changed"]] == ["tiny-llama-fp8-dynamic", "tiny-qwen2-fp8-dynamic"]
    assert plan["unchanged"] == ["tiny-llama-bf16"]
    assert all(change["inputs"] == ["versions"] and change["spec"] == [] for change in plan["changed"])
    assert builder(pipeline, "lock").returncode == 0
    assert pipeline.repro() == {"build@tiny-llama-fp8-dynamic", "build@tiny-qwen2-fp8-dynamic"}


def test_changing_one_releases_recipe_rebuilds_only_that_release(pipeline):
    release = pipeline.root / "specs" / "release" / "tiny-llama-fp8-dynamic.yaml"
    release.write_text(release.read_text() + "quant:\n  weights:\n    strategy: tensor\n")
    assert lock.write(pipeline.root) == ["locks/tiny-llama-fp8-dynamic.json"]
    assert pipeline.repro() == {"build@tiny-llama-fp8-dynamic"}
    config = json.loads((pipeline.root / "artifacts" / "tiny-llama-fp8-dynamic" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] == "tensor"


def test_changing_a_shared_recipe_rebuilds_exactly_its_users(pipeline):
    edit(pipeline.root / "specs" / "quant" / "fp8-dynamic.yaml", "ignore: [lm_head]", "ignore: [lm_head, re:.*down_proj]")
    assert lock.write(pipeline.root) == ["locks/tiny-llama-fp8-dynamic.json", "locks/tiny-qwen2-fp8-dynamic.json"]
    assert pipeline.repro() == {"build@tiny-llama-fp8-dynamic", "build@tiny-qwen2-fp8-dynamic"}


def test_push_then_pull_into_a_fresh_clone_gives_artifacts_that_verify(pipeline, tmp_path):
    pipeline.dvc("push", "-q")
    assert (tmp_path / "dvc-remote").is_dir()  # the default remote: a folder beside the repository
    pipeline.git("clone", "-q", str(pipeline.root), str(tmp_path / "clone"))
    clone = Pipeline(tmp_path / "clone")
    clone.dvc("pull", "-q")
    assert "up to date" in clone.dvc("status").stdout
    for release in PIPELINE_RELEASES:
        result = clone.run("verify", f"artifacts/{release}", check=0)
        expected = record.read(pipeline.root / "artifacts" / release).manifest["content_digest"]
        assert result.stdout.split()[-1] == expected


def test_a_newcomers_path_from_a_checkpoint_folder_to_a_verified_artifact(tmp_path):
    """docs/models.md, "Bring your own model": model add, a release file, lock, dvc add + repro, verify."""
    from conftest import init_pipeline, make_checkpoint, save_byte_tokenizer

    pipeline = init_pipeline(tmp_path / "repo", (), ())
    download = tmp_path / "download" / "Qwen3-tiny"
    make_checkpoint("tiny-qwen3", download)
    save_byte_tokenizer(download)
    added = builder(pipeline, "model", "add", "qwen3-tiny", str(download))
    assert added.returncode == 0, added.stderr
    (pipeline.root / "specs" / "release" / "qwen3-tiny-fp8-dynamic.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: qwen3-tiny\n  - override /quant: fp8-dynamic\n"
        "  - override /target: vllm-h100\n\nrelease:\n  name: qwen3-tiny-fp8-dynamic\n  version: 1.0.0\n")
    assert builder(pipeline, "lock").returncode == 0
    pipeline.dvc("add", "-q", "weights/qwen3-tiny")
    assert pipeline.repro() == {"build@qwen3-tiny-fp8-dynamic"}
    verified = builder(pipeline, "verify", "artifacts/qwen3-tiny-fp8-dynamic")
    assert verified.returncode == 0 and verified.stdout.startswith("OK qwen3-tiny-fp8-dynamic"), verified.stderr
    pipeline.commit("qwen3-tiny: first release")
    assert pipeline.repro() == set()


def test_a_docstring_in_every_builder_module_then_repro_force_leaves_dvc_lock_and_artifacts_unchanged(pipeline):
    from builder.artifact import buildinfo
    from builder.canonical import file_entries

    lock_before = (pipeline.root / "dvc.lock").read_bytes()
    artifacts = {release: pipeline.root / "artifacts" / release for release in PIPELINE_RELEASES}
    before = {release: file_entries(path) for release, path in artifacts.items()}
    sources = {buildinfo.summary(buildinfo.read(path))["source"] for path in artifacts.values()}
    for path in sorted((pipeline.root / "builder").rglob("*.py")):
        text = path.read_text()
        path.write_text('"""Reviewed: ' + text[3:] if text.startswith('"""') else '"""Reviewed."""\n' + text)
    assert pipeline.repro("--force") == BUILDS
    assert (pipeline.root / "dvc.lock").read_bytes() == lock_before
    assert {release: file_entries(path) for release, path in artifacts.items()} == before
    # who built it changed, and is on record beside each folder, outside what DVC tracks
    after = {buildinfo.summary(buildinfo.read(path))["source"] for path in artifacts.values()}
    assert len(after) == 1 and after.isdisjoint(sources)
    changed = pipeline.git("status", "--porcelain").stdout.splitlines()
    assert changed and all(line[3:].startswith("builder/") for line in changed)  # the edit, nothing else


def test_a_build_logged_to_a_file_carries_no_progress_bars_of_the_libraries_it_calls(pipeline):
    result = builder(pipeline, "build", "tiny-llama-fp8-dynamic", "--force")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "artifacts/tiny-llama-fp8-dynamic\n" and "content digest:" in result.stderr
    assert "it/s]" not in result.stderr and "%|" not in result.stderr, result.stderr
