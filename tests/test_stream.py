"""Weights as overlapping stages (builder/artifact/stream.py): each file hashed once while it is
written, errors of the worker threads raised as themselves, nothing left behind or running."""

import threading
from contextlib import contextmanager

import pytest

from builder import build as build_module
from builder import canonical, tensorfile
from builder.check.verify import verify

RELEASE = "tiny-llama-fp8-dynamic"


def test_weight_files_are_hashed_once_while_written_and_the_records_hold_those_hashes(repo, monkeypatch):
    weights = repo.add_model("tiny-llama")
    hashed = []
    original = canonical.sha256_file
    monkeypatch.setattr(canonical, "sha256_file", lambda path: hashed.append(path) or original(path))
    manifest = build_module.build(repo.root, RELEASE, log=lambda message: None)
    assert [p for p in hashed if p.suffix == ".safetensors" and p.parent != weights] == []  # only the source's
    artifact = repo.root / "artifacts" / RELEASE
    recorded = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    assert recorded["model.safetensors"] == original(artifact / "model.safetensors")
    assert verify(artifact)["content_digest"] == manifest["content_digest"]


def test_a_read_that_fails_in_the_reader_thread_is_raised_as_itself_and_leaves_nothing(repo, monkeypatch):
    repo.add_model("tiny-llama")
    original = tensorfile.reader

    @contextmanager
    def failing_reader(tensors):
        with original(tensors) as read:
            def read_or_fail(name, **options):
                if name == "model.layers.1.mlp.up_proj.weight":
                    raise OSError(5, "Input/output error")
                return read(name, **options)
            yield read_or_fail

    monkeypatch.setattr(tensorfile, "reader", failing_reader)
    with pytest.raises(OSError, match="Input/output error"):
        build_module.build(repo.root, RELEASE, log=lambda message: None)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("quantize", "read_all", "hash_all"))]
    assert not (repo.root / "artifacts").exists() or not any((repo.root / "artifacts").iterdir())
    assert [p.name for p in (repo.root / ".builder").iterdir()] == [f"artifacts--{RELEASE}.lock"]
