"""verify: every byte of an artifact is the byte its manifest lists."""

import pytest

from builder import build
from builder.errors import CheckFailed
from builder.check.verify import verify
from conftest import flip_last_byte


@pytest.fixture(scope="module")
def artifact(tiny_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "tiny-llama-fp8-dynamic"
    build.build(tiny_repo.root, "tiny-llama-fp8-dynamic", out=out, log=lambda m: None)
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    import shutil

    target = tmp_path / artifact.name
    shutil.copytree(artifact, target)
    return target


def failure(path) -> str:
    with pytest.raises(CheckFailed) as caught:
        verify(path)
    return caught.value.render()


def test_an_intact_artifact_verifies(copy):
    assert verify(copy)["files"] == 8  # config, weights, release.json, provenance.json, serve.json, README.md, tokenizer (2)


def test_verify_catches_a_flipped_byte_and_names_the_file(copy):
    flip_last_byte(copy / "model.safetensors")
    assert "tiny-llama-fp8-dynamic/model.safetensors: changed" in failure(copy)


def test_verify_catches_an_added_file(copy):
    (copy / "notes.txt").write_text("hello")
    assert "notes.txt: extra file" in failure(copy)


def test_verify_catches_a_removed_file(copy):
    (copy / "config.json").unlink()
    assert "config.json: missing" in failure(copy)


def test_verify_catches_a_manifest_whose_digest_was_edited(copy):
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"content_digest": "sha256:', '"content_digest": "sha256:0'))
    assert "content_digest" in failure(copy)


def test_verify_cli_exit_codes(tiny_repo, copy, tmp_path):
    assert tiny_repo.run("verify", str(copy)).returncode == 0
    (copy / "release.json").write_text("{}")
    result = tiny_repo.run("verify", str(copy))
    assert result.returncode == 1 and "release.json: changed" in result.stderr
    assert tiny_repo.run("verify", str(tmp_path / "nowhere")).returncode == 2
