"""Families without a planned checkpoint (builder/release/families.py derives it from the model
transformers builds): each onboarded by `builder model add` and built with bf16, fp8-dynamic,
fp8-static (KV-cache scales) and w4a16-gptq, held to what every planned family is held to
(tests/test_families.py): same bytes twice, every targeted weight quantized (every expert), loadable by
transformers with nothing missing or unexpected, logits within the same bounds, calibration exact
against the model's own forward."""

import json
import math

import pytest

from builder.release import families, memory
from builder.release.recipe import Recipe
from builder.tensorfile import read_header
from builder.source import onboard
from conftest import DERIVED, MTP, Repo, make_checkpoint, release_text, save_byte_tokenizer
from test_families import (builds_alike_quantizes_every_target_and_loads, calibration_equals_a_full_forward,
                           source_logits)  # noqa: F401 (a fixture: the source's logits, once per kind)

RECIPES = {  # recipe -> extra release keys (small calibration; group 32 divides every tiny width)
    "bf16": "", "fp8-dynamic": "",
    "fp8-static": "calibration:\n  samples: 4\n  sequence_length: 32\n",
    "w4a16-gptq": "calibration:\n  samples: 4\n  sequence_length: 32\nquant:\n  weights:\n    group_size: 32\n",
}
MOE = {"tiny-qwen2-moe", "tiny-ernie-moe", "tiny-glm4-moe", "tiny-deepseek-v3", "tiny-qwen3-next", "tiny-minimax"}
# Families whose row has no KV projections (MLA's latent cache, hybrid linear attention): fp8-static
# builds without KV-cache scales, and with them is refused (test_generic.py holds the refusal's words).
NO_KV = {kind for kind, (model_type, _) in DERIVED.items() if families.FAMILIES[model_type].attention is None}


@pytest.fixture(scope="session")
def derived_repo(tmp_path_factory) -> Repo:
    """A repository where every derived family was onboarded by `builder model add` from a folder outside it."""
    base = tmp_path_factory.mktemp("derived")
    repo = Repo.fresh(base / "repo")
    for kind in DERIVED:
        repo.onboard(kind, base / "downloads")
        for recipe, extra in RECIPES.items():
            name = f"{kind}-all-{recipe}"
            text = release_text(name, kind, recipe, "vllm-h100")
            if "calibration" in extra:
                text = text.replace("\n\nrelease:", "\n  - override /calibration: licenses\n\nrelease:")
            if recipe == "fp8-static" and kind in NO_KV:
                extra = extra + "quant:\n  kv_cache_scheme: null\n"
            (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + extra)
    return repo


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", sorted(DERIVED))
def test_every_derived_family_builds_every_recipe_twice_alike_quantizes_every_target_and_loads(
        derived_repo, source_logits, kind, recipe, tmp_path):
    from builder import build

    name = f"{kind}-all-{recipe}"
    build.build(derived_repo.root, name, out=tmp_path / name, log=lambda m: None)
    builds_alike_quantizes_every_target_and_loads(derived_repo, tmp_path / name, source_logits, kind, recipe,
                                                  tmp_path, kind in MOE)
    source = json.loads((derived_repo.root / "weights" / kind / "config.json").read_text())
    config = json.loads((tmp_path / name / "config.json").read_text())
    for key in families.FAMILIES[DERIVED[kind][0]].runtime_config:  # Granite's multipliers, Cohere's logit scale
        assert config[key] == source[key], key
    assert config["model_type"] == source["model_type"] and config["architectures"] == source["architectures"]
    if recipe == "fp8-static":  # per-tensor scales: the estimate counts them, the sum below leaves them out
        return
    spec = json.loads((tmp_path / name / "release.json").read_text())
    written = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in
                  read_header(tmp_path / name / "model.safetensors").values()
                  if info["shape"] not in ([1], [2]))  # per-tensor scalars aside, as the estimate says
    assert memory.weight_bytes(spec["model"]["architecture"], Recipe.of(spec["quant"])) == written


@pytest.mark.parametrize("kind", sorted(DERIVED))
def test_model_add_derives_every_tensor_on_disk_and_its_experts(derived_repo, kind):
    """The architecture block `builder model add` wrote plans exactly the checkpoint's tensors, by name
    and shape, and counts every expert (shared experts as dense Linears)."""
    from builder.source import load

    spec = yaml_load(derived_repo.root / "specs" / "model" / f"{kind}.yaml")
    arch, path = spec["architecture"], derived_repo.root / "weights" / kind
    planned = {t.name: t.shape for t in memory.checkpoint(arch)}
    assert planned == {name: tuple(stored.shape) for name, stored in load.tensor_index(path).items()}
    assert arch["model_type"] == DERIVED[kind][0]
    counted, stored = memory.parameters(arch), sum(math.prod(s.shape) for s in load.tensor_index(path).values())
    assert counted["total"] == stored
    if kind in MOE:
        experts = [t for t in memory.checkpoint(arch) if t.expert]
        assert len(experts) == 3 * 4 * (arch["num_hidden_layers"] - len(arch["moe"]["mlp_only_layers"]))
        idle = 1 - arch["moe"]["num_experts_per_tok"] / arch["moe"]["num_experts"]  # shared experts always run
        mtp = counted.get("mtp", 0)  # multi-token-prediction layers: in the total, not active (tiny-deepseek-v3)
        assert counted["active"] == round(stored - mtp - idle * sum(math.prod(t.shape) for t in experts))
        assert bool(mtp) == (kind in MTP)
        routers = [t.name for t in memory.checkpoint(arch) if t.cls == "router"]
        assert routers and all(name.endswith((".gate.weight", "shared_expert_gate.weight")) for name in routers)
    else:
        assert "moe" not in arch


@pytest.mark.parametrize("kind", sorted(DERIVED))
def test_calibration_maxima_equal_a_full_model_forward_for_every_derived_family(derived_repo, kind):
    calibration_equals_a_full_forward(derived_repo.root / "weights" / kind, kind)


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "w4a16-gptq"])
def test_multi_token_prediction_layers_pass_through_byte_identical_named_in_ignore_and_counted(
        derived_repo, recipe, tmp_path):
    """DeepSeek-V3's MTP layer (model.layers.{num_hidden_layers}.*, as published: embedding, enorm, hnorm,
    eh_proj, a MoE decoder layer, shared_head) is onboarded, written byte for byte as the source holds it,
    its Linears and router named in ignore (vLLM's MTP layer takes the model's quantization config), counted
    in memory and on the card; transformers loads the artifact with nothing missing, only those unexpected."""
    import torch
    from safetensors.torch import load_file

    from builder import build
    from builder.source import load
    from test_families import logits

    kind, name = "tiny-deepseek-v3", f"tiny-deepseek-v3-all-{recipe}"
    artifact = tmp_path / name
    build.build(derived_repo.root, name, out=artifact, log=lambda m: None)
    source = load_file(derived_repo.root / "weights" / kind / "model.safetensors")
    written = {k: v for path in sorted(artifact.glob("*.safetensors")) for k, v in load_file(path).items()}
    layer = f"model.layers.{DERIVED[kind][1].get('num_hidden_layers', 2)}."
    mtp = sorted(k for k in source if k.startswith(layer))
    expected = {f"{layer}{n}.weight" for n in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm",
                                               "shared_head.head", "mlp.experts.3.down_proj", "self_attn.kv_b_proj")}
    assert expected <= set(mtp)
    for key in mtp:  # the bytes as published: BF16, not quantized
        assert written[key].dtype == torch.bfloat16 and torch.equal(written[key].view(torch.int16),
                                                                    source[key].view(torch.int16)), key
        assert f"{key[: -len('.weight')]}.weight_scale" not in written
    ignore = set(json.loads((artifact / "config.json").read_text())["quantization_config"]["ignore"])
    linears = {k[: -len(".weight")] for k in mtp if k.endswith(("_proj.weight", "_mqa.weight", "mlp.gate.weight"))}
    assert len(linears) == 1 + 5 + 3 + 3 * 4 + 1 and linears <= ignore  # eh_proj, attention, shared, experts, router
    spec = json.loads((artifact / "release.json").read_text())
    counted = memory.parameters(spec["model"]["architecture"])
    assert counted["mtp"] == sum(source[k].numel() for k in mtp)
    assert counted["total"] == sum(t.numel() for t in source.values())
    card = (artifact / "README.md").read_text()
    assert f"{counted['mtp'] / 1e9:.3f} B of the total in multi-token-prediction layers" in card
    assert "40 latent values (kv_lora_rank + qk_rope_head_dim)" in card  # MLA's cache (tests/test_memory.py)
    _, info = logits(artifact, torch.zeros(1, 4, dtype=torch.long), quantized=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    unexpected = set(info["unexpected_keys"])  # transformers ignores DeepSeek-V3's at index 61 only
    assert unexpected and all(key.startswith(layer) for key in unexpected)  # (its converter fuses the experts)
    assert {key for key in mtp if ".experts." not in key} <= unexpected


def test_a_multi_token_prediction_layer_held_in_part_is_refused_naming_what_is_missing(tmp_path):
    """A checkpoint holding some of an MTP layer's tensors is refused at onboarding (kept whole or left out);
    one that leaves the layer out, as transformers and llm-compressor save DeepSeek-V3, is accepted."""
    from safetensors.torch import load_file, save_file

    from builder.errors import BuilderError

    repo, download = Repo.fresh(tmp_path / "repo"), tmp_path / "download"
    make_checkpoint("tiny-deepseek-v3", download)
    save_byte_tokenizer(download)
    tensors = load_file(download / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.eh_proj.weight"},
              download / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuilderError, match="model.layers.2.eh_proj.weight: missing from the checkpoint: a multi"):
        onboard.add_model(repo.root, "partial", download, log=lambda m: None)
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.2.")},
              download / "model.safetensors", metadata={"format": "pt"})
    onboard.add_model(repo.root, "without-mtp", download, log=lambda m: None)
    arch = yaml_load(repo.root / "specs" / "model" / "without-mtp.yaml")["architecture"]
    assert "mtp" not in memory.parameters(arch) and not [t for t in memory.checkpoint(arch) if ".layers.2." in t.name]


# The Linears vLLM 0.32 loads as one, by the names on disk (stated here apart from quantize.fused): QKVParallelLinear
# (q/k/v), deepseek_v2.py's fused_qkv_a_proj (q_a_proj and kv_a_proj_with_mqa, when the query is low-rank),
# MergedColumnParallelLinear's gate_up_proj and FusedMoE's w13 (gate/up, w1/w3). NVFP4 keeps one global scale for
# the fused Linear (compressed_tensors_w4a4_nvfp4.py: weight_global_scale.max(); the MoE method keeps w1's).
VLLM_FUSES = (("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj"), ("w1", "w3"))


@pytest.mark.parametrize("kind", sorted(DERIVED))
def test_nvfp4_gives_the_linears_vllm_fuses_one_global_scale_in_every_derived_family(derived_repo, kind, tmp_path):
    """Each group vLLM fuses has one global scale, 448 x 6 / max |w| over the group's source weights, in
    every derived family (before quantize.nvfp4 3, MLA's and rowless families' q/k/v had one each)."""
    import torch
    from safetensors.torch import load_file

    from builder import build

    name = f"{kind}-all-nvfp4a16"
    (derived_repo.root / "specs" / "release" / f"{name}.yaml").write_text(
        release_text(name, kind, "nvfp4a16", "vllm-b200"))
    build.build(derived_repo.root, name, out=tmp_path / name, log=lambda m: None)
    written = load_file(tmp_path / name / "model.safetensors")
    source = {key: value for path in sorted((derived_repo.root / "weights" / kind).glob("*.safetensors"))
              for key, value in load_file(path).items()}
    checked = set()
    for key in sorted(written):
        if not key.endswith(".weight_global_scale"):
            continue
        stem, leaf = key[: -len(".weight_global_scale")].rsplit(".", 1)
        group = next((group for group in VLLM_FUSES if leaf in group), (leaf,))
        members = [f"{stem}.{other}" for other in group if f"{stem}.{other}.weight_global_scale" in written]
        amax = max(source[f"{member}.weight"].float().abs().max() for member in members)
        for member in members:
            assert torch.equal(written[f"{member}.weight_global_scale"].float().reshape(()), 448 * 6 / amax), member
        checked.update(members if len(members) > 1 else ())
    assert checked, "no fused group was written"
    if kind == "tiny-deepseek-v3":
        assert any(member.endswith("q_a_proj") for member in checked)
    if families.FAMILIES[DERIVED[kind][0]].attention is None and kind != "tiny-deepseek-v3":
        assert any(member.endswith("self_attn.k_proj") for member in checked)
