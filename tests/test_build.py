"""Building releases: streamed, quantized, loadable, bit-for-bit repeatable."""

import json

import pytest
import torch
from safetensors import safe_open

from builder import build as build_module
from builder.errors import BuilderError
from conftest import TINY

FP8_RELATIVE = 2.0 ** -4   # E4M3 keeps 3 mantissa bits: round-to-nearest errs by <= half an ulp
FP8_SUBNORMAL = 2.0 ** -10  # below 2^-6 the E4M3 grid is evenly spaced by 2^-9: half of it


def built(repo, release, **kwargs):
    return build_module.build(repo.root, release, log=lambda message: None, **kwargs)


def tensors(path):
    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("recipe", ["bf16", "fp8-dynamic"])
def test_every_tiny_architecture_builds_in_every_recipe(tiny_repo, kind, recipe, tmp_path):
    manifest = built(tiny_repo, f"{kind}-{recipe}", out=tmp_path / "artifact")
    names = {entry["path"] for entry in manifest["files"]}
    assert {"config.json", "model.safetensors", "release.json"} <= names
    assert (tmp_path / "artifact" / "manifest.json").is_file()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_fp8_weights_follow_the_compressed_tensors_float_layout(tiny_repo, kind, tmp_path):
    built(tiny_repo, f"{kind}-fp8-dynamic", out=tmp_path / "a")
    out = tensors(tmp_path / "a")
    source = tensors(tiny_repo.root / "weights" / kind)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    quantized = [n for n in out if n.endswith("_proj.weight")]
    assert len(quantized) == 7 * TINY[kind][1]["num_hidden_layers"]
    for name in quantized:
        weight, scale = out[name], out[name.replace(".weight", ".weight_scale")]
        assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.bfloat16
        assert scale.shape == (weight.shape[0], 1)
        original = source[name].float()
        restored = weight.float() * scale.float()
        bound = torch.maximum(original.abs() * FP8_RELATIVE, scale.float() * FP8_SUBNORMAL)
        assert torch.all((restored - original).abs() <= bound + 1e-12), name
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], source[name])
    assert not any(n.startswith("lm_head") and n.endswith("_scale") for n in out)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_fp8_artifact_loads_in_transformers_with_logits_close_to_the_source(tiny_repo, kind, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    built(tiny_repo, f"{kind}-fp8-dynamic", out=tmp_path / "a")
    source = AutoModelForCausalLM.from_pretrained(tiny_repo.root / "weights" / kind, dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "a", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = source(ids).logits, quantized(ids).logits
    # E4M3 rounds each weight and activation with an RMS relative error of about 2^-4 / sqrt(3)
    # = 3.6 %; summed over independent roundings the logits' RMS relative error measures 3-4 % on
    # these models. 8 % allows for that; a wrong scale, layout or dtype gives errors near 100 %.
    relative = (actual - expected).norm() / expected.norm()
    assert relative < 0.08, float(relative)
    cosine = torch.nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.995, float(cosine)


def test_prepare_returns_the_checked_inputs_as_named_fields(tiny_repo):
    import dataclasses

    from builder.release import lock

    release = lock.locked(tiny_repo.root, "tiny-llama-fp8-dynamic")
    inputs = build_module.prepare(tiny_repo.root, release)
    norm = inputs.tensors["model.norm.weight"]
    assert norm.file == inputs.path / "model.safetensors" and norm.dtype in ("BF16", "F32")
    assert norm.shape == (inputs.config["hidden_size"],) and norm == (norm.file, norm.dtype, norm.shape)
    assert inputs.recipe == release.recipe and inputs.devices == release.devices == ()
    assert inputs.calibration_ids is None and inputs.eval_ids is None  # fp8-dynamic calibrates nothing
    assert inputs.family.model_type == "llama" and inputs.facts["class"] == "LlamaForCausalLM"
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.recipe = None


def test_building_twice_gives_the_same_content_digest(tiny_repo, tmp_path):
    first = built(tiny_repo, "tiny-qwen2-fp8-dynamic", out=tmp_path / "one")
    second = built(tiny_repo, "tiny-qwen2-fp8-dynamic", out=tmp_path / "two")
    assert first["content_digest"] == second["content_digest"]
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()


def test_small_shard_limit_splits_weights_and_writes_an_index(tiny_repo, tmp_path):
    manifest = built(tiny_repo, "tiny-llama-fp8-dynamic", out=tmp_path / "a",
                     overrides=("target.max_shard_bytes=65536",))
    names = sorted(entry["path"] for entry in manifest["files"])
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all("-of-" in n for n in shards)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with_index = tensors(tmp_path / "a")
    assert set(index["weight_map"]) == set(with_index)


def test_a_source_whose_digest_differs_from_the_pin_is_refused_before_any_work(repo, tmp_path):
    weights = repo.add_model("tiny-llama")
    (weights / "config.json").write_text((weights / "config.json").read_text() + " ")
    with pytest.raises(BuilderError, match="model.digest"):
        built(repo, "tiny-llama-fp8-dynamic")
    assert not (repo.root / "artifacts").exists()


def test_rebuilding_an_unchanged_release_is_a_no_op_and_force_rebuilds(repo):
    repo.add_model("tiny-llama")
    first = built(repo, "tiny-llama-bf16")
    out = repo.root / "artifacts" / "tiny-llama-bf16"
    inode = (out / "model.safetensors").stat().st_ino
    assert built(repo, "tiny-llama-bf16") == first
    assert (out / "model.safetensors").stat().st_ino == inode
    assert built(repo, "tiny-llama-bf16", force=True)["content_digest"] == first["content_digest"]
    assert (out / "model.safetensors").stat().st_ino != inode


def test_build_refuses_a_stale_lock(repo):
    repo.add_model("tiny-llama")
    assert repo.run("lock").returncode == 0
    spec = repo.root / "specs" / "release" / "tiny-llama-bf16.yaml"
    spec.write_text(spec.read_text().replace("0.0.1", "0.0.2"))
    result = repo.run("build", "tiny-llama-bf16")
    assert result.returncode == 2
    assert "locks/tiny-llama-bf16.json" in result.stderr and "builder lock" in result.stderr
    assert not (repo.root / "artifacts" / "tiny-llama-bf16").exists()


def test_a_failing_build_leaves_no_partial_artifact_and_keeps_the_previous_one(repo, monkeypatch):
    repo.add_model("tiny-llama")
    previous = built(repo, "tiny-llama-bf16")
    from builder.artifact import export

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_config", broken)
    with pytest.raises(OSError):
        built(repo, "tiny-llama-bf16", force=True)
    artifacts = repo.root / "artifacts"
    # the previous artifact and its buildinfo (who built it), nothing of the failed build
    assert sorted(p.name for p in artifacts.iterdir()) == ["tiny-llama-bf16", "tiny-llama-bf16.buildinfo.json"]
    from builder.check import audit
    from builder.check.verify import verify

    assert audit.built_by(artifacts / "tiny-llama-bf16")["status"] == "ok"  # still describes those files

    assert verify(artifacts / "tiny-llama-bf16")["content_digest"] == previous["content_digest"]
