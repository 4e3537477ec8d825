"""MLX artifacts in mlx-lm's layout: tensor names, dtypes and shapes as mlx-lm's loader infers its
quantization from them, config.json's quantization block and rope_theta, logits of the dequantized
weights within a bound of the source's, the same bytes twice; recipes MLX cannot hold are refused."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from builder import build
from builder.check import evaluate
from conftest import Repo, release_text

# Logits against the source (tiny random models, 40 tokens; measured: F32 2e-7 in mlx-lm itself,
# 8-bit KL 2e-6, 4-bit g64 KL 1e-4; bench/ondevice.py families runs mlx-lm on the same files).
BOUNDS = {"bf16": (1e-2, 1e-6), "8bit": (3e-2, 2e-5), "4bit": (2e-1, 1e-3)}
VARIANTS = {"bf16": {"quant": {"weights": None, "algorithm": None}}, "8bit": {"quant": {"weights": {"num_bits": 8}}},
            "4bit": {}}
KINDS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-qwen3", "tiny-llama-bias")


def release(repo: Repo, name: str, model: str, extra: dict | None = None) -> str:
    text = release_text(name, model, "mlx-4bit", "mlx")
    (repo.root / "specs" / "release" / f"{name}.yaml").write_text(text + (yaml.safe_dump(extra) if extra else ""))
    return name


@pytest.fixture(scope="module")
def mlx_repo(tmp_path_factory):
    repo = Repo.fresh(tmp_path_factory.mktemp("mlx") / "repo")
    for kind in KINDS:
        repo.add_model(kind, tokenizer=True)
    return repo


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_mlx_weights_give_the_source_logits_within_the_bounds(mlx_repo, kind):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(mlx_repo.root / "weights" / kind, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(ids).logits
        for variant, extra in VARIANTS.items():
            name = release(mlx_repo, f"{kind}-{variant}", kind, extra)
            build.build(mlx_repo.root, name, log=lambda message: None)
            got = evaluate.load_model(mlx_repo.root / "artifacts" / name)(ids).logits
            p, q = expected.log_softmax(-1), got.log_softmax(-1)
            worst, kl = float((expected - got).abs().max()), float((p.exp() * (p - q)).sum(-1).mean())
            assert worst <= BOUNDS[variant][0] and kl <= BOUNDS[variant][1], (variant, worst, kl)


def test_the_layout_is_mlx_lms_and_a_second_build_has_the_same_bytes(mlx_repo, tmp_path):
    name = release(mlx_repo, "tiny-qwen2-layout", "tiny-qwen2", {"quant": {"weights": {"group_size": 32}}})
    first = build.build(mlx_repo.root, name, out=tmp_path / "a", log=lambda message: None)
    assert build.build(mlx_repo.root, name, out=tmp_path / "b", log=lambda message: None)["content_digest"] == \
        first["content_digest"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # mlx-lm reads this one
    assert "_name_or_path" not in config and config["model_type"] == "qwen2"
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "a").iterdir()}
    with safe_open(tmp_path / "a" / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert handle.get_tensor(f"{q}.weight").dtype == torch.uint32
        assert tuple(handle.get_tensor(f"{q}.weight").shape) == (64, 64 * 4 // 32)
        assert tuple(handle.get_tensor(f"{q}.scales").shape) == tuple(handle.get_tensor(f"{q}.biases").shape) == (64, 2)
        assert handle.get_tensor(f"{q}.scales").dtype == torch.bfloat16
        assert handle.get_tensor(f"{q}.bias").dtype == torch.bfloat16  # Qwen2's q/k/v biases stay float
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # not a Linear: unquantized
    assert "lm_head.weight" not in names  # tied: mlx-lm's llama and qwen2 read embed_tokens.as_linear


def test_summary_counts_packed_weights_and_shows_scale_and_bias_statistics(mlx_repo):
    from builder.check import summary

    name = release(mlx_repo, "tiny-llama-summary", "tiny-llama")
    build.build(mlx_repo.root, name, log=lambda message: None)
    table = summary.summarize(mlx_repo.root / "artifacts" / name, details=True)
    assert table["dtypes"]["U32"]["tensors"] == 14  # 7 Linears x 2 layers
    row = table["layers"]["model.layers.0.mlp.down_proj"]
    assert row["weight"]["dtype"] == "U32" and {"min", "max", "mean"} <= set(row["scales"]) | set(row["biases"])


@pytest.mark.parametrize("overrides, fragments", [
    (["quant.weights.symmetric=true"], ["quant.weights", "mlx-lm's affine groups", "symmetric false"]),
    (["quant.weights.group_size=16"], ["quant.weights", "group_size 32, 64, 128"]),
    (["target=cpu"], ["specs/target/cpu.yaml", "vllm does not load format mlx", "cpu takes the recipes: bf16"]),
    (["quant=w4a16", "quant.weights.group_size=64"], ["specs/target/mlx.yaml", "mlx does not load format "
                                                      "compressed-tensors", "mlx takes the recipes: mlx-4bit"]),
    (["quant.weights.symmetric=false", "quant=w4a16"], ["only symmetric quantization is supported"]),
])
def test_resolve_refuses_what_mlx_cannot_hold(repo, overrides, fragments):
    result = repo.run("resolve", "smollm2-135m-instruct-mlx-4bit", *overrides)
    assert result.returncode == 2 and all(fragment in result.stderr for fragment in fragments), result.stderr


def test_the_memory_estimate_counts_a_bias_beside_every_scale(repo):
    from builder.release import memory
    from builder.release.recipe import Recipe
    from builder.release.resolve import resolve

    spec = resolve(repo.root, "smollm2-135m-instruct-mlx-4bit")
    arch, recipe = spec["model"]["architecture"], Recipe.of(spec["quant"])
    linears = sum(rows * columns for _, rows, columns in memory.linear_layers(arch))
    others = sum(size for t in memory.checkpoint(arch) if not t.linear for size in [torch.Size(t.shape).numel()])
    assert memory.weight_bytes(arch, recipe) == linears // 2 + linears // 64 * 2 * 2 + others * 2
