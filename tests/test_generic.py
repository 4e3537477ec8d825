"""Any decoder-only *ForCausalLM transformers builds, without a row in builder/release/families.py:
onboarded, calibrated through its own forward and quantized (every Linear of its decoder layers, from
the model); a recipe that needs a fact only a row gives is refused alone, naming the fact and the doc."""

import json

import pytest
import torch
import yaml

from builder import build
from builder.release import families, fused, memory
from builder.release.recipe import Recipe
from builder.source import onboard
from builder.tensorfile import read_header
from conftest import Repo, release_text, save_byte_tokenizer

# Starcoder2: no row; LayerNorm with biases, c_fc/c_proj MLP with biases, sliding window.
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048, sliding_window=8,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def generic_repo(tmp_path_factory) -> Repo:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path_factory.mktemp("generic")
    repo, download = Repo.fresh(base / "repo"), base / "downloads" / "starcoder2"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("starcoder2", **CONFIG)).to(torch.bfloat16)
    model.save_pretrained(download)
    save_byte_tokenizer(download)
    onboard.add_model(repo.root, "tiny-starcoder2", download, log=lambda m: None)
    for recipe in ("fp8-dynamic", "fp8-static", "w4a16-gptq"):
        text = release_text(f"tiny-starcoder2-{recipe}", "tiny-starcoder2", recipe, "vllm-h100")
        text = text.replace("\n\nrelease:", "\n  - override /calibration: licenses\n\nrelease:")
        extra = "calibration:\n  samples: 4\n  sequence_length: 32\n"
        if recipe == "w4a16-gptq":
            extra += "quant:\n  weights:\n    group_size: 32\n"
        (repo.root / "specs" / "release" / f"tiny-starcoder2-{recipe}.yaml").write_text(text + extra)
    return repo


def test_a_family_without_a_row_is_onboarded_with_its_checkpoint_derived(generic_repo):
    import yaml

    assert families.of_class("Starcoder2ForCausalLM").model_type == ""  # no row: the defaults
    arch = yaml.safe_load((generic_repo.root / "specs" / "model" / "tiny-starcoder2.yaml").read_text())["architecture"]
    assert arch["model_type"] == "starcoder2"
    linears = sorted(t.name for t in memory.checkpoint(arch) if t.linear)
    assert "model.layers.0.mlp.c_fc.weight" in linears and "model.layers.1.self_attn.k_proj.weight" in linears
    assert len(linears) == 2 * 6 + 1  # q, k, v, o, c_fc, c_proj per layer; lm_head


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w4a16-gptq"])
def test_a_family_without_a_row_builds_every_linear_of_its_layers_quantized_and_loads(generic_repo, recipe,
                                                                                       tmp_path):
    from test_families import IDS, logits

    name = f"tiny-starcoder2-{recipe}"
    first = build.build(generic_repo.root, name, out=tmp_path / "a", log=lambda m: None)
    assert build.build(generic_repo.root, name, out=tmp_path / "b", log=lambda m: None)["content_digest"] == \
        first["content_digest"]
    header = read_header(tmp_path / "a" / "model.safetensors")
    spec = json.loads((tmp_path / "a" / "release.json").read_text())
    arch, quant = spec["model"]["architecture"], Recipe.of(spec["quant"])
    targets = [t.name[: -len(".weight")] for t in memory.checkpoint(arch) if t.linear and quant.quantizes(
        t.name[: -len(".weight")], t.cls)]
    assert len(targets) == 12
    for module in targets:
        assert f"{module}.weight_scale" in header
    source = logits(generic_repo.root / "weights" / "tiny-starcoder2", IDS, quantized=False)[0]
    result, info = logits(tmp_path / "a", IDS, quantized=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    error = float((result - source).pow(2).mean().sqrt() / source.pow(2).mean().sqrt())
    assert error < {"fp8-dynamic": 0.15, "w4a16-gptq": 0.6}[recipe], error


def test_a_recipe_that_needs_a_fact_the_family_lacks_is_refused_alone_naming_fact_and_doc(generic_repo):
    result = generic_repo.run("resolve", "tiny-starcoder2-fp8-static", check=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "quant.kv_cache_scheme" in lines[0] and "fact 'attention'" in lines[0] and "docs/models.md" in lines[0]
    generic_repo.run("resolve", "tiny-starcoder2-fp8-static", "quant.kv_cache_scheme=null", check=0)
    generic_repo.run("resolve", "tiny-starcoder2-fp8-dynamic", check=0)
    smooth = generic_repo.run("resolve", "tiny-starcoder2-fp8-static", "quant=w8a8-int8-smoothquant", check=2)
    assert "norms_absorb" in smooth.stderr and "docs/models.md" in smooth.stderr


# Families whose experts stay fused on disk (their model's own layout; no converter gives per-expert
# names): onboarded, built in BF16 (fused, as the source), and quantizing recipes refused naming the fact:
# those the per-expert writer does not cover (tests/test_llama4_experts.py, tests/test_granite4_experts.py and
# tests/test_gpt_oss_experts.py build the others), here INT8 W8A8 (Llama 4), NVFP4 weights (Granite 4) and
# FP8 (gpt-oss, whose experts vLLM reads per expert only as weight-only integers).
REFUSED = {"llama4_text": ("w8a8-int8", "one Linear per expert (vLLM's layout)"),
           "gpt_oss": ("fp8-dynamic", "vLLM 0.32 reads gpt-oss's experts quantized one per expert only as"),
           "granitemoehybrid": ("nvfp4a16", "one Linear per expert (vLLM's layout)")}
FUSED = {
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        intermediate_size=64, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
                        attention_chunk_size=8),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8),
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"],
                             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                             shared_intermediate_size=64),
}


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_fused_experts_build_in_bf16_and_refuse_the_recipes_they_cannot_be_written_for_naming_the_fact(
        model_type, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_families import IDS, logits

    repo, download = Repo.fresh(tmp_path / "repo"), tmp_path / "downloads" / model_type
    config = {**CONFIG, "sliding_window": None, **FUSED[model_type]}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).to(torch.bfloat16).save_pretrained(
        download)
    save_byte_tokenizer(download)
    onboard.add_model(repo.root, "tiny", download, log=lambda m: None)
    quantized, words = REFUSED[model_type]
    for recipe in ("bf16", quantized):
        (repo.root / "specs" / "release" / f"tiny-{recipe}.yaml").write_text(
            release_text(f"tiny-{recipe}", "tiny", recipe, "vllm-h100"))
    build.build(repo.root, "tiny-bf16", out=tmp_path / "bf16", log=lambda m: None)
    assert any(len(info["shape"]) == 3 for info in read_header(tmp_path / "bf16" / "model.safetensors").values())
    result, info = logits(tmp_path / "bf16", IDS, quantized=False)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(result, logits(download, IDS, quantized=False)[0])
    arch = yaml.safe_load((repo.root / "specs" / "model" / "tiny.yaml").read_text())["architecture"]
    assert fused.FUSED_ON_DISK[arch["class"]] == model_type  # the README's rows of fused families
    moe = arch["moe"]  # every fused expert counted: the card's total and active parameters, fit's width check
    assert (moe["num_experts"], moe["expert_intermediate_size"]) == (4, config["intermediate_size"]), moe
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert f"(top-{config['num_experts_per_tok']} of 4 experts per token)" in card
    refused = repo.run("resolve", f"tiny-{quantized}", check=2)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "fact 'expert layout'" in lines[0] and "docs/models.md" in lines[0], refused.stderr
    assert words in lines[0], lines[0]
