"""Model sources: Hugging Face snapshots pinned to a revision, and base + delta weights."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from builder import build as build_module
from builder.canonical import file_entries, sha256_file, tree_digest
from builder.errors import BuilderError
from builder.source.importer import import_model
from conftest import make_checkpoint, model_spec, release_text

REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_model_spec(repo, name, spec):
    (repo.root / "specs" / "model" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def fake_hf_cache(cache, repo_id, revision, checkpoint):
    """The layout huggingface_hub keeps: blobs/ by hash, snapshots/<revision>/ linking to them."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for path in sorted(checkpoint.iterdir()):
        blob = folder / "blobs" / sha256_file(path).split(":")[1]
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def hf_model(repo, tmp_path, kind="tiny-llama"):
    """A tiny checkpoint placed only in a fake HF cache, and a model spec naming it by id and revision."""
    checkpoint = tmp_path / "checkpoint"
    config = make_checkpoint(kind, checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(b"pickle: never copied")
    fake_hf_cache(tmp_path / "hub", f"test/{kind}", REVISION, checkpoint)
    (checkpoint / "pytorch_model.bin").unlink()
    spec = model_spec(kind, config, tree_digest(file_entries(checkpoint)))
    spec.update(source={"kind": "hf"}, revision=REVISION)
    write_model_spec(repo, kind, spec)
    return spec


def test_hf_source_imports_the_pinned_revision_from_the_local_cache_offline(repo, tmp_path, monkeypatch):
    spec = hf_model(repo, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert import_model(repo.root, "tiny-llama", log=lambda message: None) == spec["digest"]
    weights = repo.root / "weights" / "tiny-llama"
    assert not (weights / "pytorch_model.bin").exists() and not any(p.is_symlink() for p in weights.iterdir())
    assert tree_digest(file_entries(weights)) == spec["digest"]


def test_hf_source_missing_from_cache_and_network_is_a_clear_error(repo, tmp_path, monkeypatch):
    hf_model(repo, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BuilderError) as error:
        import_model(repo.root, "tiny-llama", log=lambda message: None)
    message = str(error.value)
    assert "specs/model/tiny-llama.yaml: revision" in message
    assert f"test/tiny-llama at {REVISION} is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert not (repo.root / "weights" / "tiny-llama").exists()


def test_hf_source_needs_a_pinned_revision(repo, tmp_path):
    spec = hf_model(repo, tmp_path)
    del spec["revision"]
    write_model_spec(repo, "tiny-llama", spec)
    with pytest.raises(BuilderError, match="revision"):
        import_model(repo.root, "tiny-llama", log=lambda message: None)


def make_delta(base, finetuned, out):
    """delta = finetuned - base per tensor (BF16), with the fine-tuned model's config and side files."""
    base_tensors, tuned = load_file(base / "model.safetensors"), load_file(finetuned / "model.safetensors")
    out.mkdir(parents=True)
    delta = {name: (tuned[name].float() - base_tensors[name].float()).to(tuned[name].dtype) for name in tuned}
    save_file(delta, out / "model.safetensors", metadata={"format": "pt"})
    copy_side_files(finetuned, out)
    return delta


def copy_side_files(checkpoint, out):
    """config.json, tokenizer files: everything but the weights."""
    for path in sorted(checkpoint.iterdir()):
        if path.suffix != ".safetensors":
            shutil.copyfile(path, out / path.name)


def test_delta_release_builds_bit_for_bit_like_the_full_model(repo, tmp_path):
    base = repo.add_model("tiny-llama")  # weights/tiny-llama, specs/model/tiny-llama.yaml
    config = make_checkpoint("tiny-llama", tmp_path / "finetuned", seed=1)
    delta = make_delta(base, tmp_path / "finetuned", repo.root / "weights" / "tiny-llama-delta")
    # the full model, made independently with safetensors' own writer: full = base + delta
    full = repo.root / "weights" / "tiny-llama-full"
    full.mkdir()
    base_tensors = load_file(base / "model.safetensors")
    save_file({name: (base_tensors[name].float() + d.float()).to(d.dtype) for name, d in delta.items()},
              full / "model.safetensors", metadata={"format": "pt"})
    copy_side_files(tmp_path / "finetuned", full)
    full_digest = tree_digest(file_entries(full))
    write_model_spec(repo, "tiny-llama-full", model_spec("tiny-llama-full", config, full_digest))
    delta_spec = model_spec("tiny-llama-merged", config, full_digest)
    delta_spec["source"] = {"kind": "delta", "base": "tiny-llama", "delta_path": "weights/tiny-llama-delta",
                            "delta_digest": tree_digest(file_entries(repo.root / "weights" / "tiny-llama-delta"))}
    write_model_spec(repo, "tiny-llama-merged", delta_spec)
    for model in ("tiny-llama-full", "tiny-llama-merged"):
        (repo.root / "specs" / "release" / f"{model}-fp8.yaml").write_text(
            release_text(f"{model}-fp8", model, "fp8-dynamic"))

    assert import_model(repo.root, "tiny-llama-merged", log=lambda message: None) == full_digest
    out = {model: build_module.build(repo.root, f"{model}-fp8", out=tmp_path / model, log=lambda message: None)
           for model in ("tiny-llama-full", "tiny-llama-merged")}
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        full_bytes = (tmp_path / "tiny-llama-full" / name).read_bytes()
        assert full_bytes == (tmp_path / "tiny-llama-merged" / name).read_bytes()
    weights = {m: {r["path"]: r["sha256"] for r in manifest["files"]} for m, manifest in out.items()}
    assert weights["tiny-llama-full"]["model.safetensors"] == weights["tiny-llama-merged"]["model.safetensors"]
    assert not torch.equal(load_file(tmp_path / "tiny-llama-full" / "model.safetensors")["model.embed_tokens.weight"],
                           base_tensors["model.embed_tokens.weight"])  # the delta changed something


def test_delta_whose_tensors_do_not_match_the_base_is_refused_naming_them(repo, tmp_path):
    base = repo.add_model("tiny-llama")
    make_checkpoint("tiny-llama", tmp_path / "finetuned", seed=1)
    delta_dir = repo.root / "weights" / "tiny-llama-delta"
    make_delta(base, tmp_path / "finetuned", delta_dir)
    tensors = load_file(delta_dir / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    del tensors["model.norm.weight"]
    save_file(tensors, delta_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    spec = model_spec("tiny-llama-merged", config, "sha256:" + "0" * 64)
    spec["source"] = {"kind": "delta", "base": "tiny-llama", "delta_path": "weights/tiny-llama-delta",
                      "delta_digest": tree_digest(file_entries(delta_dir))}
    write_model_spec(repo, "tiny-llama-merged", spec)
    with pytest.raises(BuilderError) as error:
        import_model(repo.root, "tiny-llama-merged", log=lambda message: None)
    assert "model.safetensors: model.extra.weight: in the delta but not in the base" in str(error.value)
    assert "model.norm.weight: in the base but not in the delta" in str(error.value)
    assert not (repo.root / "weights" / "tiny-llama-merged").exists()
