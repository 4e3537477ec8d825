"""What tests/test_llama4_experts.py and tests/test_granite4_experts.py hold alike of a family whose experts
are fused on disk and written one Linear per expert (builder/formats/experts.py): the recipes, the
onboarding and double builds behind their fixtures, and the checks of the artifacts against the source,
compressed-tensors' decompressor and the names vLLM's MoE loaders read."""

import json

import torch

from builder import build
from builder.formats import experts
from builder.quant import fp4, mx, quantize
from builder.release import identity, memory
from builder.release.recipe import Recipe, matches
from builder.source import onboard
from builder.tensorfile import read_header
from conftest import Repo, release_text, save_byte_tokenizer

CALIBRATION = "calibration:\n  samples: 4\n  sequence_length: 32\n"
RECIPES = {"fp8-dynamic": "", "w4a16": "quant:\n  weights:\n    group_size: 32\n",
           # no KV-cache scales: neither family has a row naming its k/v projections (the fact 'attention')
           "fp8-static": CALIBRATION + "quant:\n  kv_cache_scheme: null\n",
           "w4a16-gptq": CALIBRATION + "quant:\n  weights:\n    group_size: 32\n",
           # GPTQ with imatrix_mse's searched group scales (the observer's search, for experts no token reaches too)
           "w4a16-gptq-imatrix": CALIBRATION + "quant:\n  weights:\n    group_size: 32\n",
           # compressed-tensors' FP4 and MX presets, rounded to nearest (NVFP4's activation global scale calibrated)
           "nvfp4a16": "", "nvfp4": CALIBRATION, "mxfp4a16": ""}
TARGETS = {"nvfp4a16": "vllm-b200", "nvfp4": "vllm-b200", "mxfp4a16": "vllm-b200"}  # the others: vllm-h100
RELATIVE_RMS = {"fp8-dynamic": 0.15, "w4a16": 0.5, "fp8-static": 0.15, "w4a16-gptq": 0.6, "w4a16-gptq-imatrix": 0.6,
                "nvfp4a16": 0.5, "nvfp4": 0.6, "mxfp4a16": 0.5}
EVAL = "eval:\n  samples: 2\n  sequence_length: 32\n"
# 4-bit floats move a random tiny Granite 4's perplexity on 2 x 32 tokens by ~5.6 %, past the shipped 5 % gate
FP4_GATE = {recipe: "  gate:\n    max_perplexity_increase_pct: 15.0\n" for recipe in ("nvfp4a16", "nvfp4", "mxfp4a16")}
IDS = torch.randint(1, 255, (2, 48), generator=torch.Generator().manual_seed(0))

# What vLLM 0.32's MoE layers hold for each recipe once a per-expert name is mapped (the model's expert mapping
# turns `experts.E.gate_proj.<suffix>` and `up_proj` into `experts.w13_<suffix>`, `down_proj` into `w2_`), the
# MoE methods' parameters (quantization/compressed_tensors/compressed_tensors_moe/): W8A8 FP8
# (compressed_tensors_moe_w8a8_fp8.py l. 152/164 weight, 176-232 weight_scale, 245/251 input_scale), WNA16
# (compressed_tensors_moe_wna16.py l. 195/210 weight_packed, 294/310 weight_scale, 349/355 weight_shape), NVFP4
# (compressed_tensors_moe_w4a4_nvfp4.py, for NVFP4A16 too: l. 97/110 weight_packed, 124/140 weight_scale, 151/161
# weight_global_scale, one for w1 and w3 of which l. 206-212 keeps w1's, 172/182 input_global_scale, left unread
# for A16) and MXFP4 (compressed_tensors_moe_w4a4_mxfp4.py l. 107/120 weight_packed, 133/149 weight_scale;
# compressed_tensors_moe.py l. 76-81 picks it by the weights alone).
VLLM_WEIGHT_NAME = "experts.{expert}.{part}."
VLLM_PARAM_NAME = {"gate_proj": "experts.routed_experts.w13_", "up_proj": "experts.routed_experts.w13_",
                   "down_proj": "experts.routed_experts.w2_"}  # w1 gate, w3 up into w13; w2 down
VLLM_PARAMETERS = {"fp8-dynamic": {"w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"},
                   "fp8-static": {"w13_weight", "w13_weight_scale", "w13_input_scale", "w2_weight",
                                  "w2_weight_scale", "w2_input_scale"},
                   "w4a16": {"w13_weight_packed", "w13_weight_scale", "w13_weight_shape", "w2_weight_packed",
                             "w2_weight_scale", "w2_weight_shape"}}
VLLM_PARAMETERS["w4a16-gptq"] = VLLM_PARAMETERS["w4a16-gptq-imatrix"] = VLLM_PARAMETERS["w4a16"]
VLLM_PARAMETERS["mxfp4a16"] = {"w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale"}
VLLM_PARAMETERS["nvfp4a16"] = VLLM_PARAMETERS["mxfp4a16"] | {"w13_weight_global_scale", "w2_weight_global_scale"}
VLLM_PARAMETERS["nvfp4"] = VLLM_PARAMETERS["nvfp4a16"] | {"w13_input_global_scale", "w2_input_global_scale"}
# quantization/compressed_tensors/compressed_tensors.py l. 221-232: the experts (RoutedExperts) take the scheme
# of target "Linear"; compressed_tensors_moe.py l. 36-59: checked on "{layer}.experts.0.{gate_proj,up_proj,
# down_proj}" (routed_experts.py l. 89: ckpt_gate_proj_name "gate_proj"), unquantized when ignore names them.
VLLM_EXPERT_TARGET = "Linear"


def random_model(model_type: str, config: dict, stems: list):
    """A random model of model_type (transformers' config keys), BF16, in eval mode, with the fused experts at
    stems drawn at the scale of the other Linears (whatever transformers' init does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).to(torch.bfloat16)
    with torch.no_grad():
        for stem in stems:
            fused = model.get_submodule(stem)
            fused.gate_up_proj.normal_(0, 0.05)
            fused.down_proj.normal_(0, 0.05)
    return model.eval()


def onboarded(base, name: str, model, recipes=RECIPES) -> Repo:
    """A repository with model onboarded as `name` and one release of each recipe, measured at build."""
    repo, download = Repo.fresh(base / "repo"), base / "downloads" / name
    model.save_pretrained(download)
    save_byte_tokenizer(download)
    onboard.add_model(repo.root, name, download, log=lambda m: None)
    for recipe, extra in recipes.items():
        text = release_text(f"{name}-{recipe}", name, recipe, TARGETS.get(recipe, "vllm-h100"))
        groups = "  - override /eval: docstrings\n"  # the build measures its artifact (2 windows of 32 tokens)
        if extra.startswith("calibration"):
            groups += "  - override /calibration: licenses\n"
        text = text.replace("\n\nrelease:", f"\n{groups}\nrelease:") + EVAL + FP4_GATE.get(recipe, "")
        (repo.root / "specs" / "release" / f"{name}-{recipe}.yaml").write_text(text + extra)
    return repo


def built_twice(repo: Repo, name: str, base, recipes=RECIPES) -> dict:
    """recipe -> (artifact folder, content digest of a second build into another folder)."""
    found = {}
    for recipe in recipes:
        build.build(repo.root, f"{name}-{recipe}", out=base / recipe, log=lambda m: None)
        again = build.build(repo.root, f"{name}-{recipe}", out=base / f"{recipe}-again", log=lambda m: None)
        found[recipe] = (base / recipe, again["content_digest"])
    return found


def quantized_per_expert(folder, again: str, recipe: str, stems: list, count: int, routers: list,
                         parts: tuple = experts.NAMES) -> None:
    """The checks of a build: alike twice, measured, every expert of every stem (`{block}.experts`) quantized
    under its per-expert names (parts: one expert's Linears; their tensors named as the layout writes them,
    formats/experts.py written) with no fused tensor left, routers BF16 and ignored, every Linear the estimate
    plans quantized, and the estimate's bytes those written."""
    assert json.loads((folder / "manifest.json").read_text())["content_digest"] == again
    measured = json.loads((folder / "eval.json").read_text())  # the build's own quality check ran and passed
    assert measured["gate"]["passed"] and measured["perplexity"]["artifact"] != measured["perplexity"]["source"]
    header = read_header(folder / "model.safetensors")
    assert not [name for name, info in header.items() if experts.fused(name, tuple(info["shape"]))]
    spec = json.loads((folder / "release.json").read_text())
    arch, quant = spec["model"]["architecture"], Recipe.of(spec["quant"])
    assert "experts.split" in identity.parts(spec)  # the part that splits them is in the release's id
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    fp4 = quant.weights.type == "float" and quant.weights.num_bits == 4
    values = read_tensors(folder)
    for stem in stems:
        for expert in range(count):
            for part in parts:
                module = f"{stem}.{expert}.{part}"
                leaf = "weight_packed" if quant.packed or fp4 else "weight"
                stored = header[experts.written(f"{module}.{leaf}")]
                assert stored["dtype"] == ("I32" if quant.packed else "U8" if fp4 else "F8_E4M3"), module
                assert experts.written(f"{module}.weight_scale") in header
            if quant.weights.strategy == "tensor_group":  # NVFP4: an expert's gate and up share their global scale
                gate, up = (values[f"{stem}.{expert}.{part}.weight_global_scale"] for part in ("gate_proj", "up_proj"))
                assert torch.equal(gate, up), (stem, expert)
    for router in routers:
        assert header[f"{router}.weight"]["dtype"] == "BF16"  # the router stays in BF16 and is ignored
        assert router in config["ignore"]
    linears = [t.name[: -len(".weight")] for t in memory.checkpoint(arch) if t.linear and quant.quantizes(
        t.name[: -len(".weight")], t.cls)]
    for module in linears:  # every Linear the estimate plans, experts one per expert, is written quantized
        assert experts.written(f"{module}.weight_scale") in header, module
    assert sum(".experts." in module for module in linears) == len(parts) * count * len(stems)
    if recipe != "fp8-static":  # the memory estimate counts exactly the bytes written (per-tensor scalars aside)
        written = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values()
                      if info["shape"] not in ([1], [2]))
        assert memory.weight_bytes(arch, quant) == written


def calibrated(path) -> tuple:
    """(ids, Calibration): six random windows of 24 tokens, and what calibration finds on them for the checkpoint
    at path with FP8 static inputs (every Linear's input maximum), for an oracle to compare with a full forward."""
    from builder.quant import calibrate
    from builder.source import load

    ids = torch.randint(1, 255, (6, 24), generator=torch.Generator().manual_seed(1))
    args = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
            "group_size": None}
    recipe = Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "rtn", "gptq": None,
                        "targets": ["Linear"], "ignore": ["lm_head"], "weights": args,
                        "input_activations": args, "kv_cache_scheme": None})
    found = calibrate.calibrate(path, load.tensor_index(path), load.architecture(path)["modules"], recipe, ids,
                                log=lambda m: None)
    return ids, found


def read_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def module_and_leaf(name: str) -> tuple:
    """(per-expert Linear, tensor) of an artifact's tensor name: `...experts.E.gate_proj`, `weight_packed` of
    `...experts.E.gate_proj.weight_packed`, and of gpt-oss's `...experts.E.w13_weight_packed` alike."""
    stem, _, last = name.rpartition(".")
    part, _, leaf = last.partition("_")
    if part in experts.JOINED:
        return f"{stem}.{part}", leaf
    return stem, last


def decompressed(folder, shapes: dict | None = None) -> dict:
    """{module: (weight as compressed-tensors' decompressor gives it back, the module's tensors)} of every
    per-expert Linear of an artifact (shapes: {module: [out, in]}, the `weight_shape` a layout leaves out)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.load_from_registry(config["format"])
    states = {}
    for name, value in load_file(folder / "model.safetensors").items():
        module, leaf = module_and_leaf(name)
        if module.split(".")[-3:-1][:1] == ["experts"] and module.split(".")[-2].isdigit():  # `...experts.E.<part>`
            states.setdefault(module, {})[leaf] = value
    found = {}
    for module, state in states.items():
        if config["format"] == "pack-quantized" and "weight_shape" not in state:
            state["weight_shape"] = torch.tensor(tuple(shapes[module]))
        found[module] = (compressor.decompress(dict(state), scheme)["weight"], state)
    return found


def rounded_source_values(folder, recipe: str, split: dict) -> None:
    """Each expert's decompressed weight is its source weight (split: {module: weight}) rounded with the
    artifact's scale (GPTQ: the integers it chose, which differ from rounding to nearest)."""
    found = decompressed(folder, {module: weight.shape for module, weight in split.items()})
    args = Recipe.of(json.loads((folder / "release.json").read_text())["quant"]).weights
    assert set(split) <= set(found)
    if args.type == "float" and args.num_bits == 4:
        return fp4_source_values(found, split, args)
    for module, weight in split.items():
        values, state = found[module]
        scale = state["weight_scale"].float()
        rounded = quantize.quantize_weight(weight, scale, args).float()
        if "-gptq" in recipe:  # GPTQ rounds otherwise (each expert had a Hessian): its integers
            assert not torch.equal(unpacked(state["weight_packed"], weight.shape), rounded), module
            rounded = unpacked(state["weight_packed"], weight.shape)
        expanded = scale.repeat_interleave(args.group_size, dim=1) if args.strategy == "group" else scale
        expected = (rounded * expanded).to(state["weight_scale"].dtype).float()
        assert torch.equal(values.float(), expected), module


def fp4_source_values(found: dict, split: dict, args) -> None:
    """NVFP4 and MXFP4: each expert's scales are those of builder/quant's arithmetic on its source weight (NVFP4's
    global scale from the max |w| of the expert's gate and up together), its codes the source rounded to nearest
    with them, and compressed-tensors' decompressor gives back exactly those codes times their scales."""
    for module, weight in split.items():
        values, state = found[module]
        if args.strategy == "tensor_group":
            stem, _, part = module.rpartition(".")
            siblings = [split[f"{stem}.{other}"] for other in quantize.GATE_UP] if part in quantize.GATE_UP else [weight]
            global_scale = fp4.global_scale(torch.stack([w.abs().amax().float() for w in siblings]).amax())
            assert torch.equal(state["weight_global_scale"], global_scale), module
            scale = fp4.group_scales(weight, global_scale, 16)
            assert torch.equal(state["weight_scale"].view(torch.uint8), scale.view(torch.uint8)), module
            step = fp4.steps(scale, global_scale)
        else:
            exponents = mx.group_exponents(weight, 32, 4)
            assert torch.equal(state["weight_scale"], exponents), module
            step, global_scale = mx.scales(exponents), None
        codes = fp4.quantize_weight(weight, step if global_scale is None else scale, global_scale, args.group_size)
        assert torch.equal(state["weight_packed"], codes[:, 0::2] | (codes[:, 1::2] << 4)), module
        expected = fp4.decode(codes) * step.repeat_interleave(args.group_size, 1)
        assert torch.equal(values.float(), expected.to(values.dtype).float()), module


def unpacked(words: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The signed INT4 values of compressed-tensors' pack-quantized int32 words (eight a word, the first in
    the lowest bits, each offset by 8), FP32 [rows, columns]."""
    nibbles = torch.stack([(words >> (4 * index)) & 15 for index in range(8)], dim=-1).reshape(words.shape[0], -1)
    return (nibbles[:, : shape[1]] - 8).float()


def logits_within_bounds(source, loaded, recipe: str) -> float:
    """The loaded artifact's logits against the source's on IDS: relative RMS error and cosine within the
    bounds every family is held to; returns the error."""
    with torch.no_grad():
        expected, result = source(IDS).logits, loaded(IDS).logits
    error = float((result - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())
    cosine = float(torch.nn.functional.cosine_similarity(result.flatten(), expected.flatten(), dim=0))
    assert 0 < error < RELATIVE_RMS[recipe] and cosine > 1 - RELATIVE_RMS[recipe] ** 2, (error, cosine)
    return error


def vllm_reads(folder, recipe: str, blocks: list, count: int, routers: list) -> None:
    """The per-expert names of each MoE block map onto exactly the parameters vLLM's MoE method holds for the
    recipe; the experts take the scheme of target Linear and are not ignored; the routers are."""
    header = read_header(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert VLLM_EXPERT_TARGET in group["targets"]
    for block in blocks:
        mapped = set()
        for name in (n for n in header if n.startswith(f"{block}.experts.")):
            expert, part = name.removeprefix(f"{block}.experts.").split(".")[:2]
            weight_name = VLLM_WEIGHT_NAME.format(expert=expert, part=part)
            assert int(expert) < count and weight_name in name, name
            mapped.add(name.replace(weight_name, VLLM_PARAM_NAME[part]).removeprefix(f"{block}.experts."
                                                                                     "routed_experts."))
        assert mapped == VLLM_PARAMETERS[recipe]
        for part in experts.NAMES:  # not ignored: vLLM would build them unquantized
            assert not matches(f"{block}.experts.0.{part}", "Linear", config["ignore"])
    assert set(routers) <= set(config["ignore"])
