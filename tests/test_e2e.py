"""End to end on the real bundled SmolLM2-135M-Instruct: import, lock, build, verify, load, generate."""

import json

import pytest
import torch

from conftest import Repo

pytestmark = pytest.mark.e2e
RELEASE = "smollm2-135m-instruct-fp8-dynamic"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Repo:
    """A repository with the shipped specs and the bundled model imported from its GGUF file."""
    repo = Repo.fresh(tmp_path_factory.mktemp("e2e") / "repo")
    result = repo.run("import", "smollm2-135m-instruct")
    assert result.returncode == 0, result.stderr  # fails if the conversion is not the pinned bytes
    repo.run("lock", check=0)
    return repo


def test_import_is_pinned_and_idempotent(smollm2):
    again = smollm2.run("import", "smollm2-135m-instruct", check=0)
    assert "up to date" in again.stderr


def test_default_release_builds_verifies_and_is_half_the_size(smollm2, tmp_path):
    built = smollm2.run("build", RELEASE, "--json", check=0)
    artifact = smollm2.root / "artifacts" / RELEASE
    assert smollm2.run("verify", str(artifact)).returncode == 0
    rebuilt = smollm2.run("build", RELEASE, "--out", str(tmp_path / "again"), "--json", check=0)
    assert json.loads(built.stdout)["content_digest"] == json.loads(rebuilt.stdout)["content_digest"]
    source = (smollm2.root / "weights" / "smollm2-135m-instruct" / "model.safetensors").stat().st_size
    quantized = (artifact / "model.safetensors").stat().st_size
    # Linear weights go from 2 bytes to 1 (plus a BF16 scale per row); embeddings stay BF16.
    assert 0.55 < quantized / source < 0.65


def test_fp8_artifact_generates_coherent_text_with_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    artifact = smollm2.root / "artifacts" / RELEASE
    smollm2.run("build", RELEASE, check=0)
    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    # A completion, not the chat template: this 135M model's chat answer flips between "Paris" and a
    # French ramble with the last bits of FP32 (AVX2 vs AVX-512 kernels), its completion does not.
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0][ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_bf16_release_builds_and_loads(smollm2):
    from transformers import AutoModelForCausalLM

    smollm2.run("build", "smollm2-135m-instruct-bf16", check=0)
    artifact = smollm2.root / "artifacts" / "smollm2-135m-instruct-bf16"
    assert "quantization_config" not in (artifact / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_tp3_release_ships_its_serve_json_card_and_estimated_size(smollm2):
    import json

    import yaml

    from builder.release import lock
    from builder.artifact.card import model_card
    from builder.tensorfile import read_header
    from builder.release.memory import weight_bytes
    from builder.release.recipe import Recipe
    from builder.artifact.serve import serve_config

    release = "smollm2-135m-instruct-fp8-dynamic-l4-tp3"
    smollm2.run("build", release, check=0)
    artifact, entry = smollm2.root / "artifacts" / release, lock.read(smollm2.root, release)
    serve = json.loads((artifact / "serve.json").read_text())
    locked = lock.committed(smollm2.root, release)
    assert serve == serve_config(locked) and serve["arguments"]["tensor_parallel_size"] == 3
    card = (artifact / "README.md").read_text()
    assert card == model_card(locked) and "vllm-l4" in yaml.safe_load(card.split("---\n")[1])["tags"]
    header = read_header(artifact / "model.safetensors")
    written = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    assert written == weight_bytes(entry["spec"]["model"]["architecture"], Recipe.of(entry["spec"]["quant"]))
