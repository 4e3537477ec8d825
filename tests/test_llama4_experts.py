"""Llama 4 (llama4_text) quantized with its experts written one Linear per expert (builder/formats/experts.py):
the split computes what transformers' fused experts compute, each recipe builds twice alike with every
expert quantized under vLLM's per-expert names and no fused tensor left, compressed-tensors' decompressor
gives back the values, transformers loads the artifact through the builder's loader (one Linear per
expert, its own SequentialLlama4TextExperts) with nothing missing or unexpected, logits within the bounds every family is held to; the names and
quantization_config are those vLLM's Llama 4 loader reads."""

import json

import pytest
import torch

from builder import build
from builder.formats import experts
from builder.quant import quantize
from builder.release import memory
from builder.release.recipe import Recipe
from builder.source import onboard
from builder.tensorfile import read_header
from conftest import Repo, release_text, save_byte_tokenizer

# hidden 64, experts' width 32 (not 64: a transposition mistake changes shapes), dense layers' 128; layer 1
# holds 4 experts (interleave step 2), top-1 routing, chunked attention with a NoPE layer.
CONFIG = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
              max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
              attention_chunk_size=8)
EXPERTS, WIDTH, HIDDEN, MOE_LAYERS = 4, 32, 64, (1,)
RECIPES = {"fp8-dynamic": "", "w4a16": "quant:\n  weights:\n    group_size: 32\n"}
RELATIVE_RMS = {"fp8-dynamic": 0.15, "w4a16": 0.5}  # tests/test_families.py's bounds for these recipes
IDS = torch.randint(1, 255, (2, 48), generator=torch.Generator().manual_seed(0))


def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama4_text", **CONFIG)).to(torch.bfloat16)
    with torch.no_grad():  # experts drawn at the scale of the other Linears (whatever transformers' init does)
        for layer in MOE_LAYERS:
            fused = model.model.layers[layer].feed_forward.experts
            fused.gate_up_proj.normal_(0, 0.05)
            fused.down_proj.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def llama4_repo(tmp_path_factory) -> Repo:
    base = tmp_path_factory.mktemp("llama4")
    repo, download = Repo.fresh(base / "repo"), base / "downloads" / "llama4"
    tiny_model().save_pretrained(download)
    save_byte_tokenizer(download)
    onboard.add_model(repo.root, "tiny-llama4", download, log=lambda m: None)
    for recipe, extra in RECIPES.items():
        text = release_text(f"tiny-llama4-{recipe}", "tiny-llama4", recipe, "vllm-h100")
        (repo.root / "specs" / "release" / f"tiny-llama4-{recipe}.yaml").write_text(text + extra)
    return repo


@pytest.fixture(scope="module")
def built(llama4_repo, tmp_path_factory) -> dict:
    """recipe -> (artifact folder, content digest of a second build into another folder)."""
    base, found = tmp_path_factory.mktemp("llama4-built"), {}
    for recipe in RECIPES:
        name = f"tiny-llama4-{recipe}"
        build.build(llama4_repo.root, name, out=base / recipe, log=lambda m: None)
        again = build.build(llama4_repo.root, name, out=base / f"{recipe}-again", log=lambda m: None)
        found[recipe] = (base / recipe, again["content_digest"])
    return found


def source_weights(repo: Repo) -> dict:
    from safetensors.torch import load_file

    return load_file(repo.root / "weights" / "tiny-llama4" / "model.safetensors")


def test_split_linears_compute_what_transformers_fused_experts_compute():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    fused = tiny_model().model.layers[1].feed_forward.experts.float()
    assert isinstance(fused, Llama4TextExperts)
    tokens = torch.randn(EXPERTS * 5, HIDDEN, generator=torch.Generator().manual_seed(1))  # 5 tokens per expert
    with torch.no_grad():
        expected = fused(tokens).view(EXPERTS, 5, HIDDEN)
        stem = "model.layers.1.feed_forward.experts"
        weights = {**experts.split(f"{stem}.gate_up_proj", fused.gate_up_proj),
                   **experts.split(f"{stem}.down_proj", fused.down_proj)}
        for expert in range(EXPERTS):
            x = tokens.view(EXPERTS, 5, HIDDEN)[expert]
            gate, up, down = (weights[f"{stem}.{expert}.{part}"] for part in ("gate_proj", "up_proj", "down_proj"))
            assert gate.shape == up.shape == (WIDTH, HIDDEN) and down.shape == (HIDDEN, WIDTH)
            result = torch.nn.functional.linear(fused.act_fn(x @ gate.T) * (x @ up.T), down)
            assert torch.allclose(result, expected[expert], rtol=1e-5, atol=1e-6)
            for part, weight in (("gate_proj", gate), ("down_proj", down)):  # and as the reader slices one
                read = experts.expert_weight(f"{stem}.{expert}.{part}.weight",
                                             lambda name: getattr(fused, name.rpartition(".")[2]))
                assert torch.equal(read, weight)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_builds_twice_alike_with_every_expert_quantized_under_per_expert_names(built, recipe):
    folder, again = built[recipe]
    assert json.loads((folder / "manifest.json").read_text())["content_digest"] == again
    header = read_header(folder / "model.safetensors")
    assert not [name for name in header if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    spec = json.loads((folder / "release.json").read_text())
    arch, quant = spec["model"]["architecture"], Recipe.of(spec["quant"])
    for layer in MOE_LAYERS:
        for expert in range(EXPERTS):
            for part in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{layer}.feed_forward.experts.{expert}.{part}"
                stored = header[f"{module}.weight_packed" if quant.packed else f"{module}.weight"]
                assert stored["dtype"] == ("I32" if quant.packed else "F8_E4M3"), module
                assert f"{module}.weight_scale" in header
        router = f"model.layers.{layer}.feed_forward.router"
        assert header[f"{router}.weight"]["dtype"] == "BF16"  # the router stays in BF16 and is ignored
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert router in config["ignore"]
    linears = [t.name[: -len(".weight")] for t in memory.checkpoint(arch) if t.linear and quant.quantizes(
        t.name[: -len(".weight")], t.cls)]
    for module in linears:  # attention, dense MLPs and the shared expert as before
        assert f"{module}.weight_scale" in header, module


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compressed_tensors_decompressor_gives_back_each_experts_rounded_source_values(llama4_repo, built, recipe):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    folder, _ = built[recipe]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.load_from_registry(config["format"])
    saved, source = load_file(folder / "model.safetensors"), source_weights(llama4_repo)
    args = Recipe.of(json.loads((folder / "release.json").read_text())["quant"]).weights
    for layer in MOE_LAYERS:
        stem = f"model.layers.{layer}.feed_forward.experts"
        split = {**experts.split(f"{stem}.gate_up_proj", source[f"{stem}.gate_up_proj"]),
                 **experts.split(f"{stem}.down_proj", source[f"{stem}.down_proj"])}
        assert len(split) == 3 * EXPERTS
        for module, weight in split.items():
            state = {name.removeprefix(module + "."): value for name, value in saved.items()
                     if name.startswith(module + ".")}
            decompressed = compressor.decompress(dict(state), scheme)["weight"].float()
            scale = state["weight_scale"].float()
            values = quantize.quantize_weight(weight, scale, args).float()  # the source's values, rounded
            expanded = scale.repeat_interleave(args.group_size, dim=1) if args.strategy == "group" else scale
            expected = (values * expanded).to(state["weight_scale"].dtype).float()
            assert torch.equal(decompressed, expected), module


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_transformers_loads_the_artifact_through_the_builders_loader_with_logits_within_bounds(llama4_repo, built,
                                                                                              recipe):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from builder.check import evaluate

    folder, _ = built[recipe]
    # what formats/compressed_tensors.load does, with the loading info: transformers' compressed-tensors
    # quantizer puts one Llama4TextMLP per expert in Llama4TextExperts' place, named as the artifact names them
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    loaded = evaluate.load_model(folder)  # the builder's own loader: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    source = evaluate.load_model(llama4_repo.root / "weights" / "tiny-llama4")
    with torch.no_grad():
        expected, result = source(IDS).logits, loaded(IDS).logits
    error = float((result - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())
    cosine = float(torch.nn.functional.cosine_similarity(result.flatten(), expected.flatten(), dim=0))
    assert 0 < error < RELATIVE_RMS[recipe] and cosine > 1 - RELATIVE_RMS[recipe] ** 2, (error, cosine)
    stem = "model.layers.1.feed_forward.experts"  # the experts are the artifact's, dequantized, not the source's
    for expert in range(EXPERTS):
        weight = loaded.get_parameter(f"{stem}.{expert}.gate_proj.weight")
        original = source.get_parameter(f"{stem}.gate_up_proj")[expert, :, :WIDTH].T
        assert not torch.equal(weight, original) and torch.allclose(weight, original, atol=0.02)
