"""Every supported model family, dense and mixture of experts, through every shipped recipe: same bytes
twice, every targeted weight quantized (experts included), loadable by transformers, logits close to
the source's, calibration exact against the model's own full forward."""

import json

import pytest
import torch

from builder import build
from builder.artifact import record
from builder.release import families, memory
from builder.release.recipe import Recipe
from builder.tensorfile import read_header
from conftest import FAMILIES, TINY, Repo, release_text

RECIPES = {  # recipe -> extra release keys (small calibration; group 32 divides every tiny width)
    "bf16": "", "fp8-dynamic": "", "w8a8-int8": "",
    "fp8-static": "calibration:\n  samples: 4\n  sequence_length: 32\n",
    "w4a16": "quant:\n  weights:\n    group_size: 32\n",
    "w4a16-gptq": "calibration:\n  samples: 4\n  sequence_length: 32\nquant:\n  weights:\n    group_size: 32\n",
}
KINDS = sorted(FAMILIES) + ["tiny-qwen2"]  # every family, and Qwen2 (tied embeddings, q/k/v biases)
MOE = {kind for kind in FAMILIES if "moe" in kind or "mixtral" in kind or "olmoe" in kind}
# How far a quantized tiny model's logits may move from the source's, as relative RMS (and cosine).
# Random tiny weights (N(0, 0.02), 64 wide) quantize worse than trained ones; the bounds sit at about
# twice the largest error seen over all families, so they catch broken scales or layouts (errors of
# order 1, or NaN), not rounding noise. Gemma's (1 + w) norms amplify its errors: measured up to 0.30.
RELATIVE_RMS = {"fp8-dynamic": 0.15, "fp8-static": 0.15, "w8a8-int8": 0.04, "w4a16": 0.5, "w4a16-gptq": 0.6}
QUANTIZED_DTYPES = {"fp8-dynamic": "F8_E4M3", "fp8-static": "F8_E4M3", "w8a8-int8": "I8"}


@pytest.fixture(scope="session")
def family_repo(tmp_path_factory) -> Repo:
    repo = Repo.fresh(tmp_path_factory.mktemp("families") / "repo")
    for kind in KINDS:
        repo.add_model(kind, tokenizer=True)
        for recipe, extra in RECIPES.items():
            name = f"{kind}-all-{recipe}"
            text = release_text(name, kind, recipe, "vllm-h100")
            if "calibration" in extra:
                text = text.replace("\n\nrelease:", "\n  - override /calibration: licenses\n\nrelease:")
            (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + extra)
    return repo


@pytest.fixture(scope="session")
def built(family_repo, tmp_path_factory):
    """built(kind, recipe) -> the artifact folder of that release, built once per session."""
    out, done = tmp_path_factory.mktemp("family-builds"), {}

    def get(kind: str, recipe: str):
        if (kind, recipe) not in done:
            name = release_name(family_repo, kind, recipe)
            build.build(family_repo.root, name, out=out / name, log=lambda m: None)
            done[kind, recipe] = out / name
        return done[kind, recipe]
    return get


def release_name(repo: Repo, kind: str, recipe: str) -> str:
    """The release of kind x recipe (written for the tiny models only the memory test uses)."""
    name = f"{kind}-all-{recipe}"
    if not (repo.root / "specs" / "release" / f"{name}.yaml").is_file():
        repo.add_model(kind, tokenizer=True)
        text = release_text(name, kind, recipe, "vllm-h100")
        (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + RECIPES[recipe])
    return name


@pytest.fixture(scope="session")
def source_logits():
    """kind -> the source model's logits on IDS (computed once per kind)."""
    found = {}

    def get(repo: Repo, kind: str):
        if kind not in found:
            found[kind] = logits(repo.root / "weights" / kind, IDS, quantized=False)[0]
        return found[kind]
    return get


IDS = torch.randint(1, 255, (2, 48), generator=torch.Generator().manual_seed(0))


def header_of(artifact) -> dict:
    return read_header(artifact / "model.safetensors")


def logits(path, ids, quantized: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **extra)
    with torch.no_grad():
        return model.float().eval()(ids).logits, info


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_family_builds_every_recipe_twice_alike_quantizes_every_target_and_loads(family_repo, built,
                                                                                        source_logits, kind, recipe,
                                                                                        tmp_path):
    builds_alike_quantizes_every_target_and_loads(family_repo, built(kind, recipe), source_logits, kind, recipe,
                                                  tmp_path, kind in MOE)


MTP_ROLES = ("mtp", "mtp_linear")


def builds_alike_quantizes_every_target_and_loads(family_repo, artifact, source_logits, kind, recipe, tmp_path,
                                                  moe: bool) -> None:
    """The checks every family's build of a recipe passes (tests/test_families_derived.py shares them)."""
    second = build.build(family_repo.root, artifact.name, out=tmp_path / "again", log=lambda m: None)
    assert record.read(artifact).manifest["content_digest"] == second["content_digest"]

    spec = json.loads((artifact / "release.json").read_text())
    arch, recipe_ = spec["model"]["architecture"], Recipe.of(spec["quant"])
    header = header_of(artifact)
    targets = [t.name[: -len(".weight")] for t in memory.checkpoint(arch) if t.linear and recipe_.quantizes(
        t.name[: -len(".weight")], t.cls)]
    assert bool(targets) == (recipe != "bf16")
    assert any(".experts." in name for name in targets) == (moe and recipe != "bf16")
    for module in targets:  # every weight the recipe targets is written quantized, experts included
        if recipe.startswith("w4a16"):
            assert header[f"{module}.weight_packed"]["dtype"] == "I32" and f"{module}.weight" not in header
        else:
            assert header[f"{module}.weight"]["dtype"] == QUANTIZED_DTYPES[recipe]
        assert f"{module}.weight_scale" in header
    routers = [t.name for t in memory.checkpoint(arch) if t.cls == "router"]
    assert all(header[router]["dtype"] == "BF16" for router in routers)  # routers stay BF16 ...
    config = json.loads((artifact / "config.json").read_text())
    if recipe != "bf16":  # ... and are named in ignore, as vLLM needs for Qwen-MoE's quantizable gate
        assert set(r[: -len(".weight")] for r in routers) <= set(config["quantization_config"]["ignore"])
    if recipe == "fp8-static" and recipe_.kv_cache_scheme is not None:  # every layer's KV-cache scales,
        for layer in range(arch["num_hidden_layers"]):  # Phi-3's fused qkv_proj included
            assert {f"model.layers.{layer}.self_attn.k_scale", f"model.layers.{layer}.self_attn.v_scale"} <= set(header)

    if moe and recipe == "w8a8-int8":
        # transformers 5.17 (and 5.24) cannot load int-quantized experts with dequantize=True: its MoE weight
        # converter expects weight_packed for every non-FP8 scheme (llm-compressor's own W8A8 MoE artifacts
        # fail the same way); vLLM loads these names. The layout is checked above.
        with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
            logits(artifact, torch.zeros(1, 4, dtype=torch.long), quantized=True)
        return
    source = source_logits(family_repo, kind)
    result, info = logits(artifact, IDS, quantized=recipe != "bf16")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers builds no multi-token-prediction layer and ignores DeepSeek-V3's only at index 61
    mtp = tuple({".".join(t.name.split(".")[:3]) + "." for t in memory.checkpoint(arch) if t.cls in MTP_ROLES})
    unexpected = {key for key in info["unexpected_keys"] if not key.startswith(mtp or "\0")}
    if moe and recipe == "fp8-static":  # transformers' fused-expert loader has no input scales
        unexpected = {key for key in unexpected if not (".experts." in key and key.endswith(".input_scale"))}
    assert not unexpected, sorted(unexpected)
    if recipe == "bf16":
        assert torch.equal(result, source)
        return
    error = float((result - source).pow(2).mean().sqrt() / source.pow(2).mean().sqrt())
    cosine = float(torch.nn.functional.cosine_similarity(result.flatten(), source.flatten(), dim=0))
    assert error < RELATIVE_RMS[recipe] and cosine > 1 - RELATIVE_RMS[recipe] ** 2, (error, cosine)


@pytest.mark.parametrize("kind", sorted(set(KINDS) | set(TINY)))
@pytest.mark.parametrize("recipe", ["bf16", "fp8-dynamic", "w4a16"])
def test_the_memory_estimate_counts_exactly_the_bytes_every_family_writes(built, kind, recipe):
    artifact = built(kind, recipe)
    spec = json.loads((artifact / "release.json").read_text())
    written = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header_of(artifact).values()
                  if info["shape"] not in ([1], [2]))  # per-tensor scalars aside, as the estimate says
    assert memory.weight_bytes(spec["model"]["architecture"], Recipe.of(spec["quant"])) == written


def test_a_mixture_of_experts_counts_all_its_experts_and_shows_active_parameters(built):
    artifact = built("tiny-mixtral", "fp8-dynamic")
    arch = json.loads((artifact / "release.json").read_text())["model"]["architecture"]
    counted = memory.parameters(arch)
    expert = 3 * 64 * 128  # gate, up, down of one expert
    assert counted["total"] - counted["active"] == 2 * (4 - 2) * expert  # 2 layers x 2 of 4 experts idle
    card = (artifact / "README.md").read_text()
    assert f"{counted['total'] / 1e9:.3f} B total" in card and "top-2 of 4 experts per token" in card


def test_calibration_maxima_equal_a_full_model_forward_for_every_family(family_repo):
    """The oracle: the model's own forward over the calibration windows, in calibration's batches (MKL's
    COMPATIBLE branch gives a row last bits that depend on how many rows share its GEMM, as an expert's
    token count does), experts unfused into per-expert Linears (itself checked against transformers'
    fused experts), with hooks on every Linear's input and on the keys and values entering attention:
    maxima bit for bit, both E[x²] (imatrix_mse's FP32 sums, llama.cpp's FP64 importance) to rounding."""
    for kind in KINDS:
        calibration_equals_a_full_forward(family_repo.root / "weights" / kind, kind)


def calibration_equals_a_full_forward(path, kind: str) -> None:
    """The oracle for one model (tests/test_families_derived.py shares it): experts unfused with the
    names derived from transformers' converters (equal to the planned families' rows)."""
    from transformers import AutoModelForCausalLM

    from builder.quant import calibrate, layerwise
    from builder.source import load, skeleton

    ids = torch.randint(1, 255, (6, 24), generator=torch.Generator().manual_seed(1))
    tensors, architecture = load.tensor_index(path), load.architecture(path)
    kv = ARGS if families.kv_sources(families.of_class(architecture["facts"]["class"])) else None  # none: hybrid
    recipe = Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "imatrix", "gptq": None,
                        "targets": ["Linear"], "ignore": [], "weights": {**ARGS, "observer": "imatrix_mse"},
                        "input_activations": {
                            **ARGS, "strategy": "tensor"}, "kv_cache_scheme": kv})
    found = calibrate.calibrate(path, tensors, architecture["modules"], recipe, ids, log=lambda m: None)
    family = skeleton.build(path)[1]
    if family.moe:
        assert family.expert_names == family.moe.experts, kind
    name = layerwise.register(family.calibrate_with)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=name,
                                                experts_implementation="eager").eval()
    with torch.no_grad():
        fused = full(ids).logits
        if family.expert_names:
            for layer in full.model.layers:
                if skeleton.unfusable(getattr(getattr(layer, "mlp", None), "experts", None)):
                    unfused = skeleton.Experts(layer.mlp.experts, family.expert_names)
                    for index, expert in enumerate(unfused):
                        gate, up, down = (getattr(expert, n) for n in family.expert_names)
                        size = gate.weight.shape[0]
                        gate.weight.copy_(layer.mlp.experts.gate_up_proj[index, :size])
                        up.weight.copy_(layer.mlp.experts.gate_up_proj[index, size:])
                        down.weight.copy_(layer.mlp.experts.down_proj[index])
                    layer.mlp.experts = unfused
            # the per-expert view computes the same, to rounding: one fused gate_up GEMM against two
            torch.testing.assert_close(full(ids).logits, fused, msg=kind)
    expected = {"input_amax": {}, "kv_amax": {}, "inputs": {}}
    hooks = []
    for module_name, module in full.named_modules():
        disk = skeleton.checkpoint_name(module_name, family)
        if isinstance(module, torch.nn.Linear) and disk in found.input_amax:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, disk=disk: expected["input_amax"].__setitem__(disk, torch.maximum(
                    expected["input_amax"].get(disk, torch.zeros(1)), args[0].abs().amax().reshape(1)))))
            hooks.append(module.register_forward_pre_hook(  # for E[x²] per input column
                lambda m, args, disk=disk: expected["inputs"].setdefault(disk, []).append(
                    args[0].reshape(-1, args[0].shape[-1]).clone())))
        if module_name.endswith("self_attn") and kv is not None:
            def observe(key, value, stem=module_name):
                for kind_, tensor in (("k_scale", key), ("v_scale", value)):
                    name_ = f"{stem}.{kind_}"
                    expected["kv_amax"][name_] = torch.maximum(expected["kv_amax"].get(name_, torch.zeros(1)),
                                                               tensor.abs().amax().reshape(1))
            module.builder_observe = observe
    with torch.no_grad():
        for batch in ids.split(layerwise.BATCH):
            full(batch)
    for hook in hooks:
        hook.remove()
    seen = {name_ for name_ in found.input_amax if name_ in expected["input_amax"]}
    assert seen and set(found.input_amax) - seen <= {n for n in found.input_amax if ".experts." in n}
    for statistic in ("input_amax", "kv_amax"):
        for name_, value in expected[statistic].items():
            got = getattr(found, statistic)[name_]
            assert torch.equal(got, value), (kind, name_, got, value)
    assert set(found.kv_amax) == set(expected["kv_amax"])
    assert set(found.imatrix) == seen
    assert set(found.importance) == seen
    for name_ in seen:  # sums in another order (batches of 4 against one pass): equal to rounding
        mean = torch.cat(expected["inputs"][name_]).double().square().mean(dim=0)
        for statistic in ("imatrix", "importance"):  # FP32 sums, FP64 sums
            got = getattr(found, statistic)[name_].double()
            assert torch.allclose(got, mean, rtol=1e-5, atol=1e-7), (kind, name_)


ARGS = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False, "group_size": None}


# The two ways factors are folded into each layer's norms: SmoothQuant (W8A8) and AWQ-style scaling (W4A16).
FOLDING = {"smoothing": ("quant=w8a8-int8-smoothquant",),
           "awq": ("quant=w4a16-gptq", "+quant.awq.grid=20", "quant.weights.group_size=16")}


@pytest.mark.parametrize("key", FOLDING)
@pytest.mark.parametrize("kind", KINDS)
def test_smoothquant_and_awq_keep_every_supported_familys_function_and_are_refused_for_the_others(
        family_repo, kind, key):
    """SmoothQuant's and AWQ's factors, folded into the norms and the Linears reading them, leave the
    model's logits as they were (up to FP32 rounding); families whose norms they cannot fold into are
    refused at resolve time, naming the key."""
    from transformers import AutoModelForCausalLM

    from builder.errors import BuilderError
    from builder.quant import calibrate, quantize
    from builder.source import load
    from builder.release.resolve import resolve

    path = family_repo.root / "weights" / kind
    architecture = load.architecture(path)
    family = families.of_class(architecture["facts"]["class"])
    release, overrides = f"{kind}-all-fp8-static", FOLDING[key]  # calibrates on licences
    if not families.smoothable(family):
        with pytest.raises(BuilderError) as caught:
            resolve(family_repo.root, release, overrides)
        assert [str(p) for p in caught.value.problems if f"quant.{key}" in str(p)], caught.value.problems
        return
    recipe = Recipe.of(resolve(family_repo.root, release, overrides)["quant"])
    found = calibrate.calibrate(path, load.tensor_index(path), architecture["modules"], recipe, IDS,
                                log=lambda m: None)
    for index in range(architecture["facts"]["num_hidden_layers"]):
        folded = [name for name in found.smoothing if name.startswith(f"model.layers.{index}.")]
        norms = [name for name in folded if name.endswith("layernorm.weight")]
        assert len(norms) == 2 and len(folded) >= 4  # both norms, and at least one Linear after each
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    smoothed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {name: quantize.smoothed(name, tensor, found) for name, tensor in source.state_dict().items()}
    assert sum(not torch.equal(state[name], tensor) for name, tensor in source.state_dict().items()) >= 8
    smoothed.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(IDS).logits, source(IDS).logits, rtol=1e-4, atol=1e-4)
