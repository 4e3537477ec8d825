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
from builder.formats import gguf as gguf_format, gguf_vocab, kmix
from builder.errors import BuilderError
from builder.quant import ggml, kquants
from conftest import FAMILIES, Repo, release_text

# Bounds on logits against the source (tiny random models, 40 tokens; measured: F32 0, BF16 max 3e-3,
# Q8_0 KL 4e-7, Q4_0 KL 1.2e-4): F32 is exact, so names, q/k permutation, tied embeddings, biases
# and RoPE all round-trip; the quantized types stay within their rounding.
BOUNDS = {"f32": (0.0, 0.0), "bf16": (1e-2, 1e-6), "q8_0": (2e-2, 1e-5), "q4_0": (2e-1, 1e-3)}
VARIANTS = {"f32": {"quant": {"weights": None, "algorithm": None, "dtype": "float32"}},
            "bf16": {"quant": {"weights": None, "algorithm": None}}, "q8_0": {},
            "q4_0": {"quant": {"algorithm": "rtn"}}}
KINDS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama-bias", "tiny-qwen3-hd128")
# For the K-quant mixes: ffn_down's rows of 512 values hold two super-blocks of 256 (K-quants), the other
# Linears' rows of 64 fall back to blocks of 32; three layers, so the last is a "more bits" one (Q6_K).
# Bound on |decoded - source| / |source| per tensor of the tiny random models (measured: Q4_K 0.071, Q5_K 0.036,
# Q5_0 0.042, Q5_1 0.039, Q6_K 0.018, Q8_0 0.0054): the rounding of each type, about 1.5x; a misplaced byte
# or scale gives errors near 1.
RELATIVE_ERROR = {"Q4_K": 0.11, "Q5_K": 0.055, "Q6_K": 0.03, "Q5_0": 0.065, "Q5_1": 0.06, "Q8_0": 0.01}
WIDE = {"tiny-llama-wide": ("llama", dict(intermediate_size=512, num_hidden_layers=3, tie_word_embeddings=False)),
        "tiny-qwen2-wide": ("qwen2", dict(intermediate_size=512, num_hidden_layers=3, tie_word_embeddings=True))}


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
    FAMILIES.update(WIDE)
    repo = Repo.fresh(tmp_path_factory.mktemp("gguf") / "repo")
    for kind in (*KINDS, *WIDE):
        repo.add_model(kind, tokenizer="bpe")
    for kind in ("tiny-qwen3-hd128", *WIDE):
        del FAMILIES[kind]
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
                             "llama-cpp takes the recipes: gguf-q4_0, gguf-q4_k_m, gguf-q8_0"]),
    (["+quant.ggml_mix=Q4_K_M"], ["quant.weights", "Q4_K_M's main type Q4_K as weights: type int, num_bits 4"]),
    (["quant.weights.num_bits=5"], ["quant.weights", "llama.cpp's Q8_0 (int 8) or Q4_0 (int 4) blocks",
                                    "(K-quants: quant.ggml_mix)"]),
    (["quant=gguf-q5_k_m", "calibration=licenses"], ["target.schemes", "does not run w5a16-int"]),
    (["quant=w4a16", "target=vllm-h100", "+quant.ggml_mix=Q4_K_M"],
     ["quant.ggml_mix", "Q4_K_M: llama-quantize's presets are for format gguf"]),
    (["quant=w4a16", "target=vllm-h100", "quant.weights.num_bits=5"],
     ["quant.weights.num_bits", "5-bit weights are llama.cpp's Q5_K"]),
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


def gguf_tensors(path) -> dict:
    import gguf

    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("quant, algorithm", [("gguf-q4_k_m", "rtn"), ("gguf-q4_k_m", "imatrix"),
                                              ("gguf-q5_k_m", "rtn"), ("gguf-q5_k_m", "imatrix")])
@pytest.mark.parametrize("kind", sorted(WIDE))
def test_a_k_quant_mix_gives_each_tensor_llama_quantizes_type_with_kquants_bytes(gguf_repo, tmp_path, kind, quant,
                                                                                 algorithm):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    preset = quant.split("-")[1].upper()
    extra = {"quant": {"algorithm": algorithm}}
    if quant == "gguf-q5_k_m":  # the shipped target lists the schemes of its first releases (see the release)
        extra["target"] = {"schemes": ["w16a16", "w8a16-int", "w5a16-int", "w4a16-int"]}
    if algorithm == "imatrix":
        extra["calibration"] = {"samples": 4, "sequence_length": 64}
    name = release(gguf_repo, f"{kind}-{quant}-{algorithm}", kind, quant, extra,
                   calibration="licenses" if algorithm == "imatrix" else "none")
    first = build.build(gguf_repo.root, name, out=tmp_path / "a", log=lambda message: None)
    second = build.build(gguf_repo.root, name, out=tmp_path / "b", log=lambda message: None)
    assert first["content_digest"] == second["content_digest"]
    assert "quantize.kquant" in first["inputs"]["versions"] and ("imatrix" in first["inputs"]["versions"]) == \
        (algorithm == "imatrix")
    path = tmp_path / "a" / f"{name}.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == kmix.PRESETS[preset]["file_type"]
    tensors = gguf_tensors(path)
    weights = gguf_repo.root / "weights" / kind
    config = json.loads((weights / "config.json").read_text())
    source = load_file(weights / "model.safetensors")
    names = {f"blk.{layer}.{role}.weight": f"model.layers.{layer}.{module}.weight" for layer in range(3)
             for role, module in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                  ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                  ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                  ("ffn_down", "mlp.down_proj"))}
    base, fallback = kmix.PRESETS[preset]["default"], kmix.FALLBACK[kmix.PRESETS[preset]["default"]]
    expected = {**{f"blk.{layer}.{role}.weight": fallback for layer in range(3)
                   for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")},
                **{f"blk.{layer}.attn_v.weight": "Q8_0" if layer == 2 else fallback for layer in range(3)},
                **{f"blk.{layer}.ffn_down.weight": "Q6_K" if layer == 2 else base for layer in range(3)}}
    assert {gguf_name: tensors[gguf_name].tensor_type.name for gguf_name in expected} == expected
    for gguf_name, kind_name in expected.items():  # the same choice as kmix's, asked as the writer asks
        row = int(tensors[gguf_name].shape[0])
        assert kmix.tensor_type(preset, gguf_name, int(gguf_name.split(".")[1]), 3, row,
                                tied=config["tie_word_embeddings"]) == kind_name
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"  # not targeted: the recipe's dtype
    assert ("output.weight" in tensors) == (not config["tie_word_embeddings"])
    for gguf_name in ("blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.ffn_up.weight"):
        data = np.asarray(tensors[gguf_name].data).tobytes()
        plain = kquants.quantize(source[names[gguf_name]], expected[gguf_name]).numpy().tobytes()
        if algorithm == "rtn":  # llama.cpp's reference quantizers on the source weight, as kquants writes them
            assert data == plain, gguf_name
        else:                   # the importance-weighted searches choose other scales and codes
            assert data != plain, gguf_name
    # gguf's own decoders read every quantized tensor back close to the source weight (q/k rows permuted)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for gguf_name, checkpoint_name in names.items():
        tensor = tensors[gguf_name]
        decoded = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).copy())
        weight = source[checkpoint_name].to(torch.float32)
        if kind == "tiny-llama-wide" and gguf_name.split(".")[2] in ("attn_q", "attn_k"):
            weight = gguf_format.permute(weight, heads if "attn_q" in gguf_name else kv_heads)
        error = float((decoded.reshape(weight.shape) - weight).norm() / weight.norm())
        assert error < RELATIVE_ERROR[tensor.tensor_type.name], (gguf_name, error)
    # transformers loads the file (dequantizing the K-quants) with logits close to the source's
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", gguf_file=path.name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    p, q = logits(reference, ids).log_softmax(-1), logits(model, ids).log_softmax(-1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 5e-4  # measured at most 6.5e-5


@pytest.mark.parametrize("quant", ["gguf-q4_k_m", "gguf-q5_k_m"])
def test_a_k_quant_mix_lays_its_tensors_out_where_llama_cpps_loader_looks_for_them(gguf_repo, tmp_path, quant):
    """Blocks of 144, 176, 210, 22, 24 and 34 bytes side by side: llama.cpp's loader refuses a tensor whose
    offset is not a multiple of general.alignment or whose bytes run past the file; each row must hold whole
    blocks of its type; and the tensors must tile the data section in order, each holding exactly the bytes
    its type and shape take (a gap of padding only), or the decoders read the neighbour's blocks."""
    import gguf

    extra = {"quant": {"algorithm": "rtn"}}
    if quant == "gguf-q5_k_m":  # the shipped target lists the schemes of its first releases (see the release)
        extra["target"] = {"schemes": ["w16a16", "w8a16-int", "w5a16-int", "w4a16-int"]}
    name = release(gguf_repo, f"tiny-llama-wide-{quant}-layout", "tiny-llama-wide", quant, extra)
    build.build(gguf_repo.root, name, out=tmp_path / name, log=lambda message: None)
    path = tmp_path / name / f"{name}.gguf"
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.alignment")
    alignment = field.contents() if field is not None else gguf.GGUF_DEFAULT_ALIGNMENT
    tensors = sorted(reader.tensors, key=lambda tensor: tensor.data_offset)
    assert {t.tensor_type.name for t in tensors} >= {"Q6_K", "Q8_0", "F32", "BF16"} | (
        {"Q4_K", "Q5_0"} if quant == "gguf-q4_k_m" else {"Q5_K", "Q5_1"})
    end = tensors[0].data_offset
    for tensor in tensors:
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        columns = int(tensor.shape[0])  # ggml's ne0: the values of one row
        assert columns % block == 0, tensor.name
        assert tensor.data_offset % alignment == 0 and 0 <= tensor.data_offset - end < alignment, tensor.name
        end = tensor.data_offset + tensor.n_elements // columns * (columns // block) * block_bytes
    assert end <= path.stat().st_size < end + alignment  # the last tensor ends the file, padding aside
