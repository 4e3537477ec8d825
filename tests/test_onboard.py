"""builder model add: a checkpoint folder becomes a model spec in one command, or one clear refusal."""

import json
import shutil

import pytest
import yaml

from builder.canonical import file_entries, tree_digest
from conftest import PROJECT, SHAPE, make_checkpoint, make_tokenizer, release_text, save_byte_tokenizer


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Mixtral saved the standard way (one tensor per expert), outside the repository."""
    folder = tmp_path / "downloads" / "models--acme--tiny-moe" / "snapshot"
    make_checkpoint("tiny-mixtral", folder)
    save_byte_tokenizer(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return folder


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_model_add_pins_the_checkpoint_and_writes_a_spec_that_builds(repo, checkpoint):
    result = repo.run("model", "add", "tiny-moe", str(checkpoint), check=0)
    assert "dvc add weights/tiny-moe" in result.stderr and "builder lock" in result.stderr
    assert "override /quant: fp8-dynamic" in result.stderr and "dvc repro build@tiny-moe-fp8-dynamic" in result.stderr
    spec = yaml.safe_load((repo.root / "specs" / "model" / "tiny-moe.yaml").read_text())
    assert spec["id"] == "acme/tiny-moe" and spec["license"] == "mit" and spec["path"] == "weights/tiny-moe"
    assert spec["digest"] == tree_digest(file_entries(repo.root / "weights" / "tiny-moe"))
    assert spec["architecture"]["class"] == "MixtralForCausalLM"
    assert spec["architecture"]["moe"] == {"num_experts": 4, "num_experts_per_tok": 2, "expert_intermediate_size": 128,
                                           "decoder_sparse_step": 1, "mlp_only_layers": []}
    assert not list((repo.root / "weights" / "tiny-moe").glob("README.md"))  # only weights, configs, tokenizer
    (repo.root / "specs" / "release" / "tiny-moe-fp8.yaml").write_text(release_text("tiny-moe-fp8", "tiny-moe",
                                                                                     "fp8-dynamic", "vllm-h100"))
    repo.run("build", "tiny-moe-fp8", check=0)
    config = json.loads((repo.root / "artifacts" / "tiny-moe-fp8" / "config.json").read_text())
    assert "model.layers.0.block_sparse_moe.gate" in config["quantization_config"]["ignore"]


def test_a_checkpoint_inside_the_repository_is_used_in_place(repo, checkpoint):
    shutil.copytree(checkpoint, repo.root / "weights" / "moe")
    repo.run("model", "add", "moe", "weights/moe", "--id", "acme/moe", "--license", "apache-2.0", check=0)
    spec = yaml.safe_load((repo.root / "specs" / "model" / "moe.yaml").read_text())
    assert spec["path"] == "weights/moe" and spec["id"] == "acme/moe" and spec["license"] == "apache-2.0"
    assert sorted(p.name for p in (repo.root / "weights").iterdir()) == ["moe"]


def without_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


def pickles_only(folder):
    for file in folder.glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))


def unsupported(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"],
                                                    "model_type": "gpt_neox"}))


def fused_experts(folder):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},  # transformers' in-memory names
              folder / "model.safetensors", metadata={"format": "pt"})


def spoil_weight(value):
    def spoil(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = value
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return spoil


def tokenizer_not_json(folder):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def tokenizer_beyond_the_embedding(folder):
    from conftest import make_tokenizer

    make_tokenizer(300).save_pretrained(folder)  # ids up to 299 for an embedding of 256 rows


def relabelled(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


REFUSALS = {  # name -> (how the folder is spoiled, what the one error says)
    "no tokenizer": (without_tokenizer, "missing tokenizer files"),
    "pickle weights only": (pickles_only, "only pickle weights"),
    "unsupported family": (unsupported, "GPTNeoXForCausalLM is not a supported architecture (its model has no decoder layers"),
    "experts stored fused": (fused_experts, "experts stored fused"),
    "a NaN weight": (spoil_weight(float("nan")),
                     "snapshot/model.safetensors: model.layers.1.self_attn.o_proj.weight: holds NaN"),
    "an infinite weight": (spoil_weight(float("-inf")),
                           "snapshot/model.safetensors: model.layers.1.self_attn.o_proj.weight: holds infinity"),
    "tokenizer.json not JSON": (tokenizer_not_json, "snapshot/tokenizer.json: not JSON (Expecting value"),
    "tokenizer beyond the embedding": (tokenizer_beyond_the_embedding, "snapshot/tokenizer.json: token 'w299' has "
                                       "id 299, but the embedding has 256 rows (config.json vocab_size)"),
    "model_type relabelled": (relabelled, "snapshot/config.json: model_type: 'llama' builds LlamaForCausalLM, but "
                              "architectures names MixtralForCausalLM (transformers pairs MixtralForCausalLM with "
                              "model_type 'mixtral')"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_model_add_refuses_what_a_build_would_refuse_and_writes_nothing(repo, checkpoint, case):
    spoil, message = REFUSALS[case]
    spoil(checkpoint)
    before = snapshot(repo.root)
    result = repo.run("model", "add", "tiny-moe", str(checkpoint), check=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(repo.root) == before


def test_the_refusal_of_an_unsupported_family_points_to_the_doc_that_says_how_to_add_one(repo, checkpoint):
    unsupported(checkpoint)
    result = repo.run("model", "add", "tiny-moe", str(checkpoint), check=2)
    assert 'docs/models.md, "Adding a family", says how to add one' in result.stderr
    assert "\n## Adding a family\n" in (PROJECT / "docs" / "models.md").read_text()


def test_a_granite_relabelled_as_llama_is_refused_naming_both(repo, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GraniteConfig

    folder = tmp_path / "granite"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GraniteConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer(SHAPE["vocab_size"]).save_pretrained(folder)
    relabelled(folder)
    before = snapshot(repo.root)
    result = repo.run("model", "add", "granite", str(folder), check=2)
    assert "granite/config.json: model_type: 'llama' builds LlamaForCausalLM, but architectures names " \
           "GraniteForCausalLM (transformers pairs GraniteForCausalLM with model_type 'granite')" in result.stderr
    assert snapshot(repo.root) == before


def test_a_tokenizer_shorter_than_a_padded_embedding_is_accepted_and_one_of_another_model_is_not(repo, checkpoint):
    from conftest import make_tokenizer

    make_tokenizer(200).save_pretrained(checkpoint)  # 56 rows of padding, as Qwen2.5 and Phi-3 pad theirs
    repo.run("model", "add", "tiny-moe", str(checkpoint), check=0)
    make_tokenizer(100).save_pretrained(checkpoint)  # fewer than half the rows: not padding
    result = repo.run("model", "add", "tiny-moe", str(checkpoint), "--force", check=2)
    assert "100 tokens (highest id 99) for an embedding of 256 rows (config.json vocab_size): a tokenizer of " \
           "another model?" in result.stderr


def test_the_digest_read_that_checks_every_weight_is_the_folders_tree_digest(tmp_path):
    from transformers import AutoModelForCausalLM

    from builder.source import checks

    make_checkpoint("tiny-llama", tmp_path / "sharded")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # several shards and an index
    relatives = sorted(p.relative_to(tmp_path / "sharded").as_posix() for p in (tmp_path / "sharded").rglob("*")
                       if p.is_file())
    assert len([r for r in relatives if r.endswith(".safetensors")]) > 2
    assert checks.digest_entries(tmp_path / "sharded", relatives, "sharded") == file_entries(tmp_path / "sharded")


def test_model_add_neither_replaces_a_spec_nor_takes_a_bad_name_unless_told(repo, checkpoint):
    repo.run("model", "add", "tiny-moe", str(checkpoint), check=0)
    assert "pass --force" in repo.run("model", "add", "tiny-moe", str(checkpoint), check=2).stderr
    repo.run("model", "add", "tiny-moe", str(checkpoint), "--force", check=0)
    assert "lower-case letters" in repo.run("model", "add", "Tiny MoE", str(checkpoint), check=2).stderr


def test_lock_refuses_a_pinned_digest_that_is_not_the_folders(repo):
    repo.add_model("tiny-llama")
    spec_file = repo.root / "specs" / "model" / "tiny-llama.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**spec, "digest": "sha256:" + "0" * 64}))
    result = repo.run("lock", check=2)
    assert "specs/model/tiny-llama.yaml: model.digest: sha256:000" in result.stderr
    assert f"the digest of weights/tiny-llama ({spec['digest']})" in result.stderr
    assert not (repo.root / "locks").exists()


@pytest.mark.parametrize("edit, message", [
    ({"class": "GPTNeoXForCausalLM"}, "GPTNeoXForCausalLM is not a supported architecture; supported: "),
    ({"class": "MixtralForCausalLM"}, "MixtralForCausalLM is a mixture of experts: declare moe"),
])
def test_resolve_refuses_an_architecture_it_cannot_plan_for(repo, edit, message):
    repo.add_model("tiny-llama")
    spec_file = repo.root / "specs" / "model" / "tiny-llama.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["architecture"].update(edit)
    spec_file.write_text(yaml.safe_dump(spec))
    result = repo.run("resolve", "tiny-llama-bf16", check=2)
    assert "model.architecture" in result.stderr and message in result.stderr


def test_resolve_refuses_an_untied_gemma_for_vllm(repo):
    repo.add_model("tiny-gemma2")
    spec_file = repo.root / "specs" / "model" / "tiny-gemma2.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["architecture"]["tie_word_embeddings"] = False
    spec_file.write_text(yaml.safe_dump(spec))
    result = repo.run("resolve", "tiny-gemma2-bf16", "target=vllm-h100", check=2)
    assert "vLLM loads Gemma2ForCausalLM only with a tied lm_head" in result.stderr


def test_a_declared_value_config_json_only_implies_is_accepted(repo):
    """head_dim declared, config.json without one (older hub configs): hidden / heads is what it means."""
    weights = repo.add_model("tiny-llama")
    config = json.loads((weights / "config.json").read_text())
    config.pop("head_dim", None)
    (weights / "config.json").write_text(json.dumps(config))
    spec_file = repo.root / "specs" / "model" / "tiny-llama.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec["digest"] = tree_digest(file_entries(weights))
    spec["architecture"]["head_dim"] = 16
    spec_file.write_text(yaml.safe_dump(spec))
    repo.run("build", "tiny-llama-bf16", check=0)
    spec["architecture"]["head_dim"] = 32
    spec_file.write_text(yaml.safe_dump(spec))
    assert "model.architecture.head_dim: 32 declared, but config.json means 16" in \
        repo.run("build", "tiny-llama-bf16", "--force", check=2).stderr
