"""verify --rebuild: rebuild from the recorded inputs and name the first differing file and tensor."""

import json
import shutil

import pytest

from builder import build
from builder.artifact import record
from builder.build import rebuild
from builder.canonical import pretty_json
from builder.errors import BuilderError, CheckFailed
from builder.paths import MANIFEST_FILE
from builder.release import lock
from builder.tensorfile import read_header
from conftest import flip_last_byte

RELEASE = "tiny-qwen2-fp8-dynamic"


@pytest.fixture(scope="module")
def artifact(tiny_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuild") / RELEASE
    build.build(tiny_repo.root, RELEASE, out=out, log=lambda m: None)
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    shutil.copytree(artifact, tmp_path / RELEASE)
    return tmp_path / RELEASE


def test_rebuilding_an_intact_artifact_gives_the_same_bytes(tiny_repo, copy):
    result = rebuild(tiny_repo.root, copy, log=lambda m: None)
    assert result["content_digest"] == record.read(copy).manifest["content_digest"]


def test_an_artifact_records_the_release_it_was_built_from(tiny_repo, artifact):
    assert record.read(artifact).release() == lock.locked(tiny_repo.root, RELEASE)
    assert record.read(artifact).release().to_entry() == record.read(artifact).entry


def test_rebuild_refuses_a_recorded_spec_this_builder_cannot_read_naming_its_key(tiny_repo, copy):
    spec = json.loads((copy / "release.json").read_text())
    spec["quant"]["bogus"] = 1  # as a builder with other spec models might have written
    (copy / "release.json").write_text(pretty_json(spec))
    with pytest.raises(BuilderError) as raised:
        rebuild(tiny_repo.root, copy, log=lambda m: None)
    assert [(p.file, p.key) for p in raised.value.problems] == [(f"{RELEASE}/release.json", "quant.bogus")]
    assert "cannot build the recorded spec again" in raised.value.render()


def test_rebuild_names_the_first_differing_file_and_tensor(tiny_repo, copy):
    header = read_header(copy / "model.safetensors")
    last = max(header, key=lambda name: header[name]["data_offsets"][1])  # owns the file's last byte
    flip_last_byte(copy / "model.safetensors")
    with pytest.raises(CheckFailed) as caught:
        rebuild(tiny_repo.root, copy, log=lambda m: None)
    message = caught.value.render()
    assert f"{RELEASE}/model.safetensors: differs from the rebuild" in message
    assert f"first differing tensor: {last}" in message


def test_rebuild_names_a_file_the_rebuild_does_not_write(tiny_repo, copy):
    (copy / "added.txt").write_text("x")
    with pytest.raises(CheckFailed, match=f"{RELEASE}/added.txt: extra file"):
        rebuild(tiny_repo.root, copy, log=lambda m: None)


def test_rebuild_refuses_when_the_recorded_toolchain_is_not_the_installed_one(tiny_repo, copy):
    recorded = record.read(copy).manifest
    recorded["inputs"]["toolchain"]["torch"] = "2.0.0"
    (copy / MANIFEST_FILE).write_text(pretty_json(recorded))
    with pytest.raises(BuilderError, match="inputs.toolchain: recorded .*'torch': '2.0.0'"):
        rebuild(tiny_repo.root, copy, log=lambda m: None)


def test_verify_rebuild_on_the_command_line_leaves_the_artifact_untouched(tiny_repo, copy):
    before = {path.name: path.stat().st_mtime_ns for path in copy.iterdir()}
    result = tiny_repo.run("verify", "--rebuild", str(copy), check=0)
    assert "rebuilt bit for bit" in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in copy.iterdir()} == before
