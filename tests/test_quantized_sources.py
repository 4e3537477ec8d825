"""Sources published quantized (`builder model add` of a quantized checkpoint, source kind `quantized`): every
format read dequantizes to exactly what compressed-tensors' own decompressor (transformers' FP8
dequantization for the legacy layout) makes of the same files; the result onboards and builds like any
source; `builder import` remakes it byte for byte from the pinned quantized folder; and what cannot be read
is refused in one line with nothing written."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from builder import build
from builder.canonical import file_entries, tree_digest
from conftest import Repo, flip_last_byte, published_like, release_text

BLOCKS_32 = "quant:\n  weights:\n    block_structure: [32, 32]\n  input_activations:\n    group_size: 32\n"
# release recipe -> (target, extra release YAML): what our own builder publishes, read back as sources
GROUPS_32 = "quant:\n  weights:\n    group_size: 32\n"
PUBLISHED = {"fp8-block": ("vllm-h200", BLOCKS_32), "fp8-block-legacy": ("vllm-h200", BLOCKS_32),
             "fp8-dynamic": ("vllm-h100", ""), "w4a16": ("vllm-h100", GROUPS_32), "w8a8-int8": ("vllm-h100", "")}
CT_PRESETS = ("MXFP4A16", "NVFP4A16")  # written by compressed-tensors' own compressors from the BF16 model


def quiet(message):
    return None


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple:
    """(repo, recipe -> quantized checkpoint folder): tiny-llama built with each recipe, plus the same model
    compressed by compressed-tensors itself in MXFP4 and NVFP4."""
    repo = Repo.fresh(tmp_path_factory.mktemp("qsrc") / "repo")
    weights = repo.add_model("tiny-llama", tokenizer=True)
    out = tmp_path_factory.mktemp("qsrc-out")
    folders = {}
    for quant, (target, extra) in PUBLISHED.items():
        name = f"tiny-llama-{quant}"
        (repo.root / "specs" / "release" / f"{name}.yaml").write_text(release_text(name, "tiny-llama", quant, target)
                                                                      + extra)
        folders[quant] = out / quant
        build.build(repo.root, name, out=folders[quant], log=quiet)
    for preset in CT_PRESETS:
        folders[preset] = compressed_by_compressed_tensors(weights, out / preset, preset)
    return repo, folders


def compressed_by_compressed_tensors(source, folder, preset: str):
    """The BF16 checkpoint with every decoder Linear compressed by compressed-tensors' compressor for preset
    (scales from its own calculate_qparams / generate_gparam over each weight's groups)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    form = "nvfp4-pack-quantized" if preset.startswith("NV") else "mxfp4-pack-quantized"
    compressor = BaseCompressor.load_from_registry(form)
    tensors = {}
    with safe_open(source / "model.safetensors", "pt") as handle:
        for name in handle.keys():
            value = handle.get_tensor(name)
            if ".layers." not in name or not name.endswith("_proj.weight"):
                tensors[name] = value
                continue
            module, weight = name[: -len(".weight")], value.float()
            groups = weight.reshape(weight.shape[0], -1, args.group_size)
            state = {"weight": weight}
            if form.startswith("nvfp4"):
                state["weight_global_scale"] = generate_gparam(weight.min(), weight.max())
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, state.get("weight_global_scale"))
            state["weight_scale"] = scale
            for leaf, tensor in compressor.compress(state, scheme).items():
                tensors[f"{module}.{leaf}"] = tensor.contiguous()
    return published_like(source, folder, tensors, QuantizationConfig(
        config_groups={"group_0": scheme}, format=form, quant_method="compressed-tensors",
        ignore=["lm_head"]).model_dump())


def reference(folder) -> dict:
    """name -> the weights compressed-tensors' decompressor (or, for the legacy fp8 layout, transformers'
    dequantizing loader) makes of folder, in the config's dtype."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if config["quant_method"] == "fp8":
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
        return {name: value.detach() for name, value in model.state_dict().items()}
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate({**group, "targets": group["targets"]})
    compressor = BaseCompressor.load_from_registry(group.get("format") or config["format"])
    with safe_open(folder / "model.safetensors", "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    found = {}
    for module in sorted({name.rpartition(".")[0] for name in stored if name.endswith((".weight_scale"))}):
        state = {name.rpartition(".")[2]: value for name, value in stored.items() if name.rpartition(".")[0] == module}
        found[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(torch.bfloat16)
    return found


def added(repo: Repo, name: str, folder) -> dict:
    """`builder model add NAME folder` (exit 0); returns the model spec it wrote."""
    repo.run("model", "add", name, str(folder), check=0)
    return yaml.safe_load((repo.root / "specs" / "model" / f"{name}.yaml").read_text())


def read_all(folder) -> dict:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("quant", [*PUBLISHED, *CT_PRESETS])
def test_a_quantized_source_dequantizes_to_its_own_library_values_and_builds(published, quant):
    repo, folders = published
    name = f"src-{quant.lower()}"
    spec = added(repo, name, folders[quant])
    assert spec["source"]["kind"] == "quantized" and spec["source"]["path"] == f"weights/{name}-quantized"
    assert spec["architecture"]["class"] == "LlamaForCausalLM"
    ours, expected = read_all(repo.root / spec["path"]), reference(folders[quant])
    original = read_all(repo.root / "weights" / "tiny-llama")
    assert set(ours) == set(original)  # the checkpoint's own names: no scales, no packed tensors
    assert all(value.dtype == torch.bfloat16 for value in ours.values())
    quantized = [name for name in expected if name in ours and ".layers." in name and name.endswith("_proj.weight")]
    assert len(quantized) == 14  # every decoder Linear of both layers
    for tensor in expected:
        if tensor in ours:
            assert torch.equal(ours[tensor], expected[tensor]), tensor
    assert torch.equal(ours["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    config = json.loads((repo.root / spec["path"] / "config.json").read_text())
    assert "quantization_config" not in config
    release = f"{name}-bf16"
    (repo.root / "specs" / "release" / f"{release}.yaml").write_text(release_text(release, name, "bf16"))
    folder = repo.root / "out" / release
    build.build(repo.root, release, out=folder, log=quiet)
    assert torch.equal(read_all(folder)["model.layers.0.mlp.down_proj.weight"], ours["model.layers.0.mlp.down_proj.weight"])


def test_import_remakes_the_dequantized_weights_from_the_pinned_quantized_folder(published):
    repo, folders = published
    spec = added(repo, "src-import", folders["w4a16"])
    weights = repo.root / spec["path"]
    before = tree_digest(file_entries(weights))
    shutil.rmtree(weights)
    result = repo.run("import", "src-import", check=0)
    assert "imported" in result.stderr
    assert tree_digest(file_entries(weights)) == before == spec["digest"]


def test_a_changed_quantized_source_is_refused_by_import_and_nothing_is_written(published):
    repo, folders = published
    spec = added(repo, "src-tampered", folders["fp8-block"])
    shutil.rmtree(repo.root / spec["path"])
    flip_last_byte(repo.root / spec["source"]["path"] / "model.safetensors")
    result = repo.run("import", "src-tampered", check=2)
    assert "source.digest" in result.stderr and "Traceback" not in result.stderr
    assert not (repo.root / spec["path"]).exists()


def test_an_unreadable_quantization_method_is_refused_in_one_line_with_nothing_written(published, tmp_path):
    repo, folders = published
    folder = tmp_path / "gptq-model"
    shutil.copytree(repo.root / "weights" / "tiny-llama", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    result = repo.run("model", "add", "src-gptq", str(folder), check=2)
    assert "'gptq'" in result.stderr and "quantization_config.quant_method" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (repo.root / "specs" / "model" / "src-gptq.yaml").exists()
    assert not (repo.root / "weights" / "src-gptq").exists()
    assert not (repo.root / "weights" / "src-gptq-quantized").exists()
