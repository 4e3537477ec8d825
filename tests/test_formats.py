"""Output formats behind one interface and one registry (builder/formats/): every registered module
answers the whole interface, and a new format is one module plus a registry entry: a toy format
registered here resolves, builds, verifies, summarises, serves and evaluates with no other edit."""

import json

import pytest
import torch
import yaml

import toy_format
from builder import build, formats
from builder.check import evaluate, summary
from builder.check.verify import verify
from builder.errors import BuilderError
from builder.release import identity, lock, recipe as recipes
from builder.release.release import Release
from conftest import release_text

EVERY_FORMAT = ("VERSION", "PACKAGES", "QUANTIZER", "FAMILIES", "CONTAINER", "LIBRARY", "VLLM",
                "problems", "recognizes", "load", "prepare")
SAFETENSORS_FORMAT = ("SCALES", "plan", "config")
QUANTIZING_SAFETENSORS_FORMAT = ("known", "compute")
OWN_CONTAINER = ("write", "file_name", "summary", "difference")


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_every_registered_format_answers_the_interface_of_its_container(name):
    module = formats.of(name)
    names = EVERY_FORMAT + (SAFETENSORS_FORMAT if module.CONTAINER == formats.SAFETENSORS else OWN_CONTAINER)
    if module.CONTAINER == formats.SAFETENSORS and name != "dense":  # dense quantizes nothing
        names += QUANTIZING_SAFETENSORS_FORMAT
    assert [attribute for attribute in names if not hasattr(module, attribute)] == []
    assert identity.OUTPUT_VERSIONS[f"format.{name}"] == module.VERSION


def test_an_unknown_format_names_the_known_ones():
    with pytest.raises(BuilderError) as raised:
        formats.of("onnx")
    assert "onnx: unknown format" in raised.value.render() and "compressed-tensors, dense, fp8, gguf, mlx" in \
        raised.value.render()


def toy_release(root, model: str) -> Release:
    """A release of model in format toy (FP8 per-row, weight-only), resolved as any
    release is: a recipe file and a target that loads the format, nothing else."""
    quant = yaml.safe_load((root / "specs" / "quant" / "fp8-dynamic.yaml").read_text())
    quant.update(format="toy", input_activations=None)
    (root / "specs" / "quant" / "toy.yaml").write_text(yaml.safe_dump(quant, sort_keys=False))
    target = yaml.safe_load((root / "specs" / "target" / "cpu.yaml").read_text())
    target.update(formats=["toy"], schemes=["w8a16-fp8"])
    (root / "specs" / "target" / "toy-runtime.yaml").write_text(yaml.safe_dump(target, sort_keys=False))
    (root / "specs" / "release" / f"{model}-toy.yaml").write_text(release_text(f"{model}-toy", model, "toy",
                                                                               "toy-runtime"))
    return lock.locked(root, f"{model}-toy", ())


def test_a_toy_format_in_the_registry_builds_verifies_summarises_and_evaluates(repo, monkeypatch, tmp_path):
    monkeypatch.setitem(formats.FORMATS, "toy", toy_format)  # the one line a new format adds
    source = repo.add_model("tiny-llama")
    release = toy_release(repo.root, "tiny-llama")
    assert release.inputs["versions"]["format.toy"] == 1 and "quantize.float" in release.inputs["versions"]
    staging = tmp_path / "toy"
    staging.mkdir()
    manifest = build.build_into(release, build.prepare(repo.root, release), staging, repo.root,
                                log=lambda message: None)

    assert verify(staging)["content_digest"] == manifest["content_digest"]
    config = json.loads((staging / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "toy"}
    table = summary.summarize(staging, details=True)
    assert table["dtypes"]["F8_E4M3"]["tensors"] == 14  # 7 Linears x 2 layers
    q_proj = table["layers"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["toy_scale"]["dtype"] == "F32" and 0 < q_proj["toy_scale"]["min"] <= q_proj["toy_scale"]["max"]
    serve = json.loads((staging / "serve.json").read_text())
    assert "quantization" not in serve["arguments"]  # VLLM None: no --quantization

    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = evaluate.load_model(source)(ids).logits.log_softmax(-1)
        got = evaluate.load_model(staging)(ids).logits.log_softmax(-1)
    kl = float((expected.exp() * (expected - got)).sum(-1).mean())
    assert 0 < kl < 1e-3  # FP8 per-row rounding: close to the source, not equal


def test_a_toy_format_build_is_deterministic(repo, monkeypatch, tmp_path):
    monkeypatch.setitem(formats.FORMATS, "toy", toy_format)
    repo.add_model("tiny-qwen2")
    release = toy_release(repo.root, "tiny-qwen2")
    digests = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        digests.append(build.build_into(release, build.prepare(repo.root, release), tmp_path / name, repo.root,
                                        log=lambda message: None)["content_digest"])
    assert digests[0] == digests[1]
