"""MLX's float modes (mxfp4, nvfp4, mxfp8): the same codes and scales as mx.quantize (tests/reference/mlx_modes.json,
from mlx 0.32.4 through bench/reference_vectors.py), decoding that is exact, recipes that say a mode, and
tiny-model builds in mlx-lm's layout that the evaluation loader reads back exactly, the same bytes twice."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from builder import build
from builder.check import evaluate
from builder.formats import mlx
from builder.quant import affine, mlxfp
from builder.release.recipe import Recipe
from conftest import Repo, release_text

REFERENCE = json.loads((Path(__file__).parent / "reference" / "mlx_modes.json").read_text())
CASES, SWEEPS = REFERENCE["cases"], REFERENCE["sweeps"]
INPUT = torch.from_numpy(np.frombuffer(bytes.fromhex(REFERENCE["input"]), np.float32).reshape(REFERENCE["shape"]).copy())


@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}-{c['dtype']}" for c in CASES])
def test_quantize_equals_mlx_bit_for_bit(case):
    dtype = getattr(torch, case["dtype"])
    packed, scales, biases = mlxfp.quantize(INPUT.to(dtype), case["bits"], case["group_size"], dtype)
    assert packed.dtype == torch.uint32 and scales.dtype == torch.uint8 and biases is None
    assert packed.view(torch.int32).numpy().tobytes().hex() == case["packed"]
    assert scales.numpy().tobytes().hex() == case["scales"]


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s["mode"] for s in SWEEPS])
def test_scales_equal_mlx_for_every_bfloat16_group_maximum_in_range(sweep):
    start, stop = sweep["bfloat16_bits"]
    maxima = (torch.arange(start, stop, dtype=torch.int32) << 16).view(torch.float32)
    weight = torch.zeros(len(maxima), sweep["group_size"])
    weight[:, 0] = maxima
    _, scales, _ = mlxfp.quantize(weight.to(torch.bfloat16), sweep["bits"], sweep["group_size"], torch.bfloat16)
    assert scales.numpy().tobytes().hex() == sweep["scales"]


@pytest.mark.parametrize("bits, group_size", sorted(mlxfp.MODES))
def test_dequantized_weights_are_the_codes_times_the_scales_and_never_clip_an_mx_maximum(bits, group_size):
    torch.manual_seed(0)
    x = (torch.randn(6, 128) * 0.05).to(torch.bfloat16)
    packed, scales, _ = mlxfp.quantize(x, bits, group_size, torch.bfloat16)
    decoded = mlxfp.dequantize(packed, scales, None, bits)
    groups = x.to(torch.float32).reshape(6, -1, group_size)
    error = (decoded.reshape(6, -1, group_size) - groups).abs().amax(dim=-1)
    amax = groups.abs().amax(dim=-1)
    assert bool((error <= amax / (4 if bits == 4 else 16)).all())  # within half a step of the coarsest grid
    if mlxfp.MODES[(bits, group_size)] != "nvfp4":  # the E8M0 scale is rounded up: max |w| / scale <= element max
        assert bool((mx_scales(scales) * mlxfp.ELEMENT_MAX[bits] >= amax).all())


def mx_scales(exponents):
    return torch.ldexp(torch.ones(exponents.shape), exponents.to(torch.int32) - 127)


def test_dequantize_reads_affine_groups_as_affine():
    x = torch.randn(4, 64)
    packed, scales, biases = affine.quantize(x, 4, 32, torch.float32)
    assert torch.equal(mlxfp.dequantize(packed, scales, biases, 4), affine.dequantize(packed, scales, biases, 4))


def test_fp4_ties_go_to_the_smaller_magnitude_and_negative_zero_is_code_zero():
    values = torch.tensor([0.25, -0.25, -0.2, 0.75, -0.75, 2.5, -5.0, 7.0, float("inf"), float("nan")])
    assert mlxfp.e2m1(values).tolist() == [0, 0, 0, 1, 9, 4, 14, 7, 0, 0]


def recipe(**weights) -> Recipe:
    args = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False,
                scale_dtype="uint8")
    return Recipe.of({"format": "mlx", "dtype": "bfloat16", "algorithm": "rtn", "gptq": None, "targets": ["Linear"],
                      "ignore": ["lm_head"], "weights": {**args, **weights}, "input_activations": None,
                      "kv_cache_scheme": None})


@pytest.mark.parametrize("weights, mode", [({}, "mxfp4"), ({"group_size": 16, "scale_dtype": "float8_e4m3fn"}, "nvfp4"),
                                           ({"num_bits": 8}, "mxfp8")])
def test_a_float_recipe_names_its_mlx_mode_and_quantizer(weights, mode):
    found = recipe(**weights)
    assert mlx.problems(found, None) == []
    assert mlx.mode(found.weights) == mode and mlx.quantizer(found) == "quantize.mlxfp"
    assert "quantize.mlxfp" in found.parts and "quantize.affine" not in found.parts
    assert found.scheme_class == f"{mode}a16"


@pytest.mark.parametrize("weights", [{"group_size": 64}, {"group_size": 16}, {"num_bits": 8, "group_size": 16},
                                     {"scale_dtype": "float8_e4m3fn"}, {"strategy": "tensor_group", "group_size": 16,
                                                                         "scale_dtype": "float8_e4m3fn"}])
def test_a_float_recipe_that_is_no_mlx_mode_is_refused_naming_the_modes(weights):
    found = mlx.problems(recipe(**weights), None)
    assert [key for key, _ in found] == [("quant", "weights")]
    assert "mxfp4" in found[0][1] and "nvfp4" in found[0][1] and "mxfp8" in found[0][1]


def test_the_config_block_names_the_mode_as_mlx_lm_writes_it():
    found = mlx.config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, recipe(num_bits=8))
    assert found["quantization"] == found["quantization_config"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}


# Logits of tiny-llama (40 tokens) against the source's, measured: max |diff| 0.080 / 0.064 / 0.016 and mean
# KL 2.0e-4 / 1.5e-4 / 5.7e-6 (mxfp4 / nvfp4 / mxfp8; affine 4-bit g64: KL 1e-4, tests/test_mlx.py)
BOUNDS = {"mxfp4": (2e-1, 1e-3), "nvfp4": (2e-1, 1e-3), "mxfp8": (5e-2, 3e-5)}


@pytest.fixture(scope="module")
def modes_repo(tmp_path_factory):
    repo = Repo.fresh(tmp_path_factory.mktemp("mlx-modes") / "repo")
    repo.add_model("tiny-llama", tokenizer=True)
    for name in BOUNDS:
        (repo.root / "specs" / "release" / f"tiny-llama-mlx-{name}.yaml").write_text(
            release_text(f"tiny-llama-mlx-{name}", "tiny-llama", f"mlx-{name}", "mlx-fp"))
    return repo


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_a_mode_build_is_mlx_lms_layout_read_back_exactly_and_the_same_bytes_twice(modes_repo, name, tmp_path):
    from transformers import AutoModelForCausalLM

    release = f"tiny-llama-mlx-{name}"
    first = build.build(modes_repo.root, release, out=tmp_path / "a", log=lambda message: None)
    assert build.build(modes_repo.root, release, out=tmp_path / "b", log=lambda message: None)["content_digest"] == \
        first["content_digest"]
    folder, args = tmp_path / "a", mlx.MODES[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == \
        {"bits": args["num_bits"], "group_size": args["group_size"], "mode": name}
    source = AutoModelForCausalLM.from_pretrained(modes_repo.root / "weights" / "tiny-llama", dtype=torch.float32).eval()
    model = evaluate.load_model(folder)
    q = "model.layers.0.self_attn.q_proj"
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert not any(key.endswith(".biases") for key in handle.keys())
        packed, scales = handle.get_tensor(f"{q}.weight"), handle.get_tensor(f"{q}.scales")
        assert packed.dtype == torch.uint32 and scales.dtype == torch.uint8
        rows, columns = source.get_parameter(f"{q}.weight").shape
        assert tuple(packed.shape) == (rows, columns * args["num_bits"] // 32)
        assert tuple(scales.shape) == (rows, columns // args["group_size"])
        expected = mlxfp.quantize(source.get_parameter(f"{q}.weight").detach().to(torch.bfloat16), args["num_bits"],
                                  args["group_size"], torch.bfloat16)
        assert torch.equal(packed, expected[0]) and torch.equal(scales, expected[1])
        assert torch.equal(model.get_parameter(f"{q}.weight"), mlxfp.dequantize(packed, scales, None, args["num_bits"]))
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = source(ids).logits, model(ids).logits
    p, r = want.log_softmax(-1), got.log_softmax(-1)
    worst, kl = float((want - got).abs().max()), float((p.exp() * (p - r)).sum(-1).mean())
    assert worst <= BOUNDS[name][0] and kl <= BOUNDS[name][1], (worst, kl)


def test_target_mlx_refuses_a_float_mode_and_names_mlx_fp(repo):
    result = repo.run("resolve", "smollm2-135m-instruct-mlx-mxfp4", "target=mlx")
    assert result.returncode == 2 and "does not run mxfp4a16" in result.stderr and "mlx-4bit" in result.stderr, \
        result.stderr
