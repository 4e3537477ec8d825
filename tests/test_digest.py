"""The source's pinned digest, checked while the build streams it (builder/source/digest.py): one read
of the weights, the digest of builder.canonical unchanged, a tampered source refused with nothing
published."""

import os
import random

import pytest
import torch

from builder import build as build_module
from builder import tensorfile
from builder.canonical import file_entries, tree_digest
from builder.errors import BuilderError
from builder.source import digest as digest_module
from builder.release import lock
from builder.source.load import refusal

RELEASE = "tiny-llama-fp8-dynamic"
REFUSED = ("model.digest: weights/tiny-llama has digest .* but the spec pins .*"
           "refusing a source that is not the pinned one")


def built(repo, release, **kwargs):
    return build_module.build(repo.root, release, log=lambda message: None, **kwargs)


def tamper_in_place(repo, path, offset: int) -> None:
    """Flip one bit at offset, keeping the file's size, inode and modification time: the lock's
    cheap check (builder.release.cache.folder_digest: names, sizes, inodes, times, remembered here
    first) still passes, only reading the bytes can tell."""
    lock.locked(repo.root, RELEASE)
    status = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def data_offset(path, name: str) -> int:
    """Where tensor name's bytes begin in a safetensors file."""
    header, start = tensorfile.header_and_start(path)
    return start + header[name]["data_offsets"][0]


def published(repo) -> list:
    """What the build put in artifacts/ (the folder itself is made when a build stages)."""
    return sorted((repo.root / "artifacts").glob("*"))


def streamed(folder, pinned, reads):
    """A StreamedDigest of folder fed with reads [(file, name)], each read as the build reads it."""
    tensors = tensorfile.index_of(sorted(folder.glob("*.safetensors")))
    digest = digest_module.StreamedDigest(folder, pinned, lambda actual: refusal("m.yaml", "digest", "w", actual,
                                                                                 pinned))
    with tensorfile.reader(tensors) as read:
        for name in reads:
            digest.add(tensors[name].file, name, read(name))
    return digest


def test_the_streamed_digest_is_the_tree_digest_whatever_is_read_and_in_which_order(repo):
    weights = repo.add_model("tiny-llama")
    pinned = tree_digest(file_entries(weights))
    names = sorted(tensorfile.read_header(weights / "model.safetensors"))
    shuffled = random.Random(0).sample(names, len(names))
    for reads in (names, shuffled, names[::2], [], names + names[:3]):
        streamed(weights, pinned, reads).check()  # raises when it differs


def test_a_build_reads_the_source_weights_once_and_hashes_that_read(repo, monkeypatch):
    weights = repo.add_model("tiny-llama")
    size = (weights / "model.safetensors").stat().st_size
    header_bytes = tensorfile.header_and_start(weights / "model.safetensors")[1]
    read_again, original = [], digest_module.FilePrefix.read_through

    def counted(prefix, stop):
        before = prefix.done
        original(prefix, stop)
        read_again.append(prefix.done - before)

    monkeypatch.setattr(digest_module.FilePrefix, "read_through", counted)
    built(repo, RELEASE)
    assert 0 < sum(read_again) <= header_bytes < size  # the digest itself read the header, nothing more


def test_a_source_changed_in_place_is_refused_while_streaming_and_nothing_is_published(repo):
    weights = repo.add_model("tiny-llama")
    previous = built(repo, RELEASE)
    out = repo.root / "artifacts" / RELEASE
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    tamper_in_place(repo, weights / "model.safetensors", data_offset(weights / "model.safetensors",
                                                                "model.layers.1.mlp.up_proj.weight") + 5)
    with pytest.raises(BuilderError, match=REFUSED):
        built(repo, RELEASE, force=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the previous one, untouched
    assert previous["content_digest"] == built(repo, RELEASE)["content_digest"]  # still up to date
    assert [p.name for p in (repo.root / ".builder").iterdir()] == [f"artifacts--{RELEASE}.lock"]  # no staging


def test_a_tampered_source_is_refused_for_its_digest_whatever_it_breaks_first(repo):
    weights = repo.add_model("tiny-llama")
    file = weights / "model.safetensors"
    tamper_in_place(repo, file, 9)  # the header's first JSON byte: `{` becomes `z`, no longer JSON
    with pytest.raises(BuilderError, match=REFUSED) as refused:
        built(repo, RELEASE)
    assert "corrupt safetensors header" in str(refused.value.__cause__)  # what broke first, kept as the cause
    assert published(repo) == []


def test_a_nan_written_into_the_source_is_refused_as_a_source_that_is_not_the_pinned_one(repo):
    weights = repo.add_model("tiny-llama")
    file = weights / "model.safetensors"
    offset = data_offset(file, "model.layers.0.self_attn.q_proj.weight")
    lock.locked(repo.root, RELEASE)
    status = file.stat()
    with open(file, "r+b") as handle:  # a BF16 NaN: the quantizer refuses it first, then the digest
        handle.seek(offset)
        handle.write(torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    os.utime(file, ns=(status.st_atime_ns, status.st_mtime_ns))
    with pytest.raises(BuilderError, match=REFUSED):
        built(repo, RELEASE)
    assert published(repo) == []


def test_the_source_folder_is_refused_through_the_command_line_with_exit_code_2(repo):
    weights = repo.add_model("tiny-llama")
    assert repo.run("lock").returncode == 0
    tamper_in_place(repo, weights / "model.safetensors", data_offset(weights / "model.safetensors",
                                                                "model.norm.weight"))
    result = repo.run("build", RELEASE)
    assert result.returncode == 2
    assert "refusing a source that is not the pinned one" in result.stderr
    assert published(repo) == []
