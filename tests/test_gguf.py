"""GGUF artifacts for llama.cpp: transformers' GGUF loader reads them back with the source's logits (within
the bounds below), gguf's GGUFReader reads every key and tensor, the bytes repeat, and bad input is
refused before anything is written."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from builder import build
from builder.formats import gguf_vocab
from builder.errors import BuilderError
from builder.quant import ggml
from conftest import FAMILIES, Repo, release_text

# Bounds on logits against the source (tiny random models, 40 tokens; measured: F32 0, BF16 max 3e-3,
# Q8_0 KL 4e-7, Q4_0 KL 1.2e-4): F32 is exact, so names, q/k permutation, tied embeddings, biases
# and RoPE all round-trip; the quantized types stay within their rounding.
BOUNDS = {"f32": (0.0, 0.0), "bf16": (1e-2, 1e-6), "q8_0": (2e-2, 1e-5), "q4_0": (2e-1, 1e-3)}
VARIANTS = {"f32": {"quant": {"weights": None, "algorithm": None, "dtype": "float32"}},
            "bf16": {"quant": {"weights": None, "algorithm": None}}, "q8_0": {},
            "q4_0": {"quant": {"algorithm": "rtn"}}}
KINDS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama-bias", "tiny-qwen3-hd128")


def release(repo: Repo, name: str, model: str, quant: str = "gguf-q8_0", extra: dict | None = None,
            calibration: str = "none") -> str:
    text = release_text(name, model, quant, "llama-cpp").replace(
        "\n\nrelease:", f"\n  - override /calibration: {calibration}\n\nrelease:")
    (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + (yaml.safe_dump(extra) if extra else ""))
    return name


@pytest.fixture(scope="module")
def gguf_repo(tmp_path_factory):
    """Tiny models of every family the GGUF writer covers, with a byte-level BPE vocabulary."""
    # transformers reads qwen3's head_dim from its config default (128), not the file: give it 128
    FAMILIES["tiny-qwen3-hd128"] = ("qwen3", dict(head_dim=128))
    repo = Repo.fresh(tmp_path_factory.mktemp("gguf") / "repo")
    for kind in KINDS:
        repo.add_model(kind, tokenizer="bpe")
    del FAMILIES["tiny-qwen3-hd128"]
    return repo


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.to(torch.float32)


def gguf_model(artifact):
    from transformers import AutoModelForCausalLM

    name = next(artifact.glob("*.gguf")).name
    return AutoModelForCausalLM.from_pretrained(artifact, gguf_file=name, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_gguf_loader_reads_every_family_back_within_the_bounds(gguf_repo, kind):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(gguf_repo.root / "weights" / kind, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    expected = logits(source, ids)
    for variant, extra in VARIANTS.items():
        name = release(gguf_repo, f"{kind}-{variant}", kind, extra=extra)
        build.build(gguf_repo.root, name, log=lambda message: None)
        got = logits(gguf_model(gguf_repo.root / "artifacts" / name), ids)
        p, q = expected.log_softmax(-1), got.log_softmax(-1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        worst = float((expected - got).abs().max())
        max_diff, max_kl = BOUNDS[variant]
        assert worst <= max_diff and kl <= max_kl, (variant, worst, kl)


def test_gguf_reader_reads_back_every_key_and_tensor_and_a_second_build_has_the_same_bytes(gguf_repo, tmp_path):
    import gguf

    name = release(gguf_repo, "tiny-qwen2-q4_0-imatrix", "tiny-qwen2", "gguf-q4_0",
                   {"calibration": {"samples": 4, "sequence_length": 64}}, calibration="licenses")
    first = build.build(gguf_repo.root, name, out=tmp_path / "a", log=lambda message: None)
    second = build.build(gguf_repo.root, name, out=tmp_path / "b", log=lambda message: None)
    assert first["content_digest"] == second["content_digest"]
    path = tmp_path / "a" / f"{name}.gguf"
    reader = gguf.GGUFReader(path)
    keys = {field.name: field.contents() for field in reader.fields.values() if not field.name.startswith("GGUF.")}
    config = json.loads((gguf_repo.root / "weights" / "tiny-qwen2" / "config.json").read_text())
    vocabulary = gguf_vocab.vocabulary(gguf_repo.root / "weights" / "tiny-qwen2", config)
    assert keys.pop("general.architecture") == "qwen2" and keys.pop("general.name") == name
    assert {k: keys.pop(f"tokenizer.ggml.{k}") for k in list(vocabulary) if k != "chat_template"} == \
        {k: v for k, v in vocabulary.items() if k != "chat_template"}
    assert keys.pop("qwen2.block_count") == 2 and keys.pop("qwen2.attention.head_count_kv") == 2
    assert keys.pop("general.file_type") == 2 and keys.pop("general.quantization_version") == 2  # MOSTLY_Q4_0
    assert keys.pop("general.license") == "apache-2.0" and keys.pop("general.base_model.0.name") == "test/tiny-qwen2"
    assert not any("path" in k or "date" in k or "uuid" in k for k in keys)  # nothing local or timed
    tensors = {t.name: t for t in reader.tensors}
    source = {k for k in ("token_embd.weight", "output_norm.weight")}
    assert source <= set(tensors) and "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert len(tensors) == 2 + 2 * 12  # embedding, norm; per layer: 2 norms, q/k/v and their biases, o, gate/up/down
    for tensor in reader.tensors:  # every tensor starts at a multiple of the 32-byte alignment
        assert tensor.data_offset % 32 == 0
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type.name == "Q4_0" and list(q.shape) == [64, 64]
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"  # not targeted: stays in the recipe's dtype
    decoded = ggml.dequantize(torch.from_numpy(np.asarray(q.data).copy()), "Q4_0", 64)
    assert torch.allclose(decoded, torch.from_numpy(gguf.quants.dequantize(np.asarray(q.data), q.tensor_type)))


def test_imatrix_rounding_uses_the_calibration_and_differs_from_the_reference(gguf_repo, tmp_path):
    import gguf

    imatrix = release(gguf_repo, "tiny-llama-imatrix", "tiny-llama", "gguf-q4_0",
                      {"calibration": {"samples": 4, "sequence_length": 64}}, calibration="licenses")
    rtn = release(gguf_repo, "tiny-llama-rtn", "tiny-llama", "gguf-q4_0", {"quant": {"algorithm": "rtn"}})
    entries = {name: build.build(gguf_repo.root, name, log=lambda message: None) for name in (imatrix, rtn)}
    assert {"imatrix", "calibration", "data"} <= set(entries[imatrix]["inputs"]["versions"])
    assert not {"imatrix", "calibration"} & set(entries[rtn]["inputs"]["versions"])
    data = {name: {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(
        gguf_repo.root / "artifacts" / name / f"{name}.gguf").tensors} for name in entries}
    assert data[imatrix]["blk.0.ffn_down.weight"] != data[rtn]["blk.0.ffn_down.weight"]
    assert data[imatrix]["token_embd.weight"] == data[rtn]["token_embd.weight"]


def test_a_vocabulary_llama_cpp_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    repo = Repo.fresh(tmp_path / "repo")
    repo.add_model("tiny-llama", tokenizer=True)  # byte-level, but no merges
    name = release(repo, "no-merges", "tiny-llama")
    with pytest.raises(BuilderError, match="model.merges is empty"):
        build.build(repo.root, name, log=lambda message: None)
    assert not (repo.root / "artifacts").exists() and not (repo.root / ".builder").exists()
    other = Repo.fresh(tmp_path / "other")
    other.add_model("tiny-llama")  # a word-level vocabulary
    result = other.run("build", release(other, "word-level", "tiny-llama"))
    assert result.returncode == 2 and "byte-level BPE (GPT-2 style) vocabularies only" in result.stderr
    assert not (other.root / "artifacts").exists()


def test_an_unknown_pre_tokenizer_is_named_by_its_hash(gguf_repo, tmp_path):
    source = tmp_path / "tokenizer"
    shutil.copytree(gguf_repo.root / "weights" / "tiny-llama", source)
    document = json.loads((source / "tokenizer.json").read_text())
    document["pre_tokenizer"]["add_prefix_space"] = True  # not GPT-2's split, and in no table
    (source / "tokenizer.json").write_text(json.dumps(document))
    config = json.loads((source / "config.json").read_text())
    with pytest.raises(BuilderError, match="pre-tokenizer not recognised \\(llama.cpp chkhsh [0-9a-f]{64}\\)"):
        gguf_vocab.vocabulary(source, config)


@pytest.mark.parametrize("overrides, fragments", [
    (["target=vllm-h100"], ["specs/target/vllm-h100.yaml", "target.formats", "vllm does not load format gguf",
                            "vllm-h100 takes the recipes: bf16, fp8-dynamic, fp8-dynamic-gptq-imatrix, fp8-static"]),
    (["quant=fp8-dynamic"], ["specs/target/llama-cpp.yaml", "llama-cpp does not load format compressed-tensors",
                             "llama-cpp takes the recipes: gguf-q4_0, gguf-q8_0"]),
    (["quant.weights.group_size=64"], ["quant.weights", "llama.cpp's Q8_0 (int 8) or Q4_0 (int 4) blocks"]),
    (["quant.algorithm=imatrix", "calibration=licenses"], ["quant.algorithm", "8-bit weights takes rtn"]),
    (["quant.input_activations={num_bits: 8, type: int, strategy: token, symmetric: true, dynamic: true, "
      "group_size: null}"], ["quant.input_activations", "must be null with format gguf"]),
])
def test_resolve_refuses_what_llama_cpp_does_not_run_naming_target_and_recipes(repo, overrides, fragments):
    result = repo.run("resolve", "smollm2-135m-instruct-gguf-q8_0", *overrides)
    assert result.returncode == 2 and all(fragment in result.stderr for fragment in fragments), result.stderr


def test_resolve_refuses_families_and_rope_scaling_the_gguf_writer_does_not_cover(repo):
    model = yaml.safe_load((repo.root / "specs" / "model" / "smollm2-135m-instruct.yaml").read_text())
    model["architecture"]["class"] = "Phi3ForCausalLM"
    (repo.root / "specs" / "model" / "phi3-shape.yaml").write_text(yaml.safe_dump(model))
    result = repo.run("resolve", "smollm2-135m-instruct-gguf-q8_0", "model=phi3-shape")
    assert result.returncode == 2 and "Phi3ForCausalLM: format gguf is written for LlamaForCausalLM, " \
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in result.stderr
    model["architecture"].update({"class": "LlamaForCausalLM", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    (repo.root / "specs" / "model" / "llama3-rope.yaml").write_text(yaml.safe_dump(model))
    result = repo.run("resolve", "smollm2-135m-instruct-gguf-q8_0", "model=llama3-rope")
    assert result.returncode == 2 and "rope_type llama3: format gguf is written for unscaled RoPE only" in result.stderr


def test_verify_audit_summary_and_eval_treat_a_gguf_artifact_like_any_other(gguf_repo, tmp_path):
    from builder.check import summary, verify
    from builder.check import evaluate

    name = release(gguf_repo, "tiny-llama-checked", "tiny-llama")
    build.build(gguf_repo.root, name, log=lambda message: None)
    artifact = gguf_repo.root / "artifacts" / name
    assert verify.verify(artifact)["files"] == 5  # .gguf, release.json, serve.json, README.md, provenance.json
    table = summary.summarize(artifact, details=True)
    assert table["dtypes"]["Q8_0"]["tensors"] == 14 and table["layers"]["blk.0.attn_q"]["weight"]["dtype"] == "Q8_0"
    assert "Q8_0" in summary.render(table)
    assert type(evaluate.load_model(artifact)).__name__ == "LlamaForCausalLM"
    rebuilt = gguf_repo.run("verify", "--rebuild", str(artifact))
    assert rebuilt.returncode == 0, rebuilt.stderr
    data = bytearray((artifact / f"{name}.gguf").read_bytes())
    data[-100] ^= 1
    (artifact / f"{name}.gguf").write_bytes(bytes(data))
    result = gguf_repo.run("verify", str(artifact))
    assert result.returncode == 1 and f"{name}.gguf: changed" in result.stderr
    assert gguf_repo.run("audit", str(artifact)).returncode == 1
