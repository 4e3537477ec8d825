"""A release that cannot run where it is meant to fails at resolve time, naming file, key and numbers."""

import pytest
import yaml

from builder import cli
from builder.release import fit
from builder.errors import BuilderError
from builder.release.recipe import Recipe
from builder.release.resolve import resolve

SMOLLM2_FP8 = "smollm2-135m-instruct-fp8-dynamic"
SMOLLM2_BF16 = "smollm2-135m-instruct-bf16"

# Group files a row writes into the test repository before resolving: (group, option) -> content.
FILES = {
    ("context", "32k"): {"max_model_len": 32768, "max_num_seqs": 8, "prefill_chunk_size": 512,
                         "buckets": {"prefill": [[1, 512]], "decode": [[8, 32768]]}},
    ("context", "unsorted"): {"max_model_len": 2048, "max_num_seqs": 8, "prefill_chunk_size": 512,
                              "buckets": {"prefill": [[1, 512], [1, 128]], "decode": [[8, 2048]]}},
    ("context", "oversized"): {"max_model_len": 2048, "max_num_seqs": 8, "prefill_chunk_size": 512,
                               "buckets": {"prefill": [[1, 4096]], "decode": [[1, 2048], [16, 2048]]}},
    ("context", "tiny-chunk"): {"max_model_len": 2048, "max_num_seqs": 64, "prefill_chunk_size": 32,
                                "buckets": {"prefill": [[1, 32]], "decode": [[64, 2048]]}},
    ("target", "gpu-1gib"): {"runtime": "vllm", "runtime_versions": ">=0.32.0,<0.33",
                             "device": {"kind": "cuda", "name": "T-1GiB", "compute_capability": "8.9",
                                        "memory_bytes": 1 << 30, "count": 1},
                             "memory_utilization": 0.9, "schemes": ["w16a16", "w8a8-fp8"],
                             "activation_scales": ["dynamic"], "kv_cache_dtypes": ["auto"],
                             "max_shard_bytes": 5000000000},
    ("target", "bad-range"): {"runtime": "vllm", "runtime_versions": "0.32 or newer",
                              "device": {"kind": "cpu", "memory_bytes": 1 << 34, "count": 1},
                              "memory_utilization": 0.5, "schemes": ["w8a8-fp8"],
                              "activation_scales": ["dynamic"], "kv_cache_dtypes": ["auto"],
                              "max_shard_bytes": 5000000000},
    # Llama-2-7B's shape: 11008 / 128 = 86 weight groups in down_proj, which 4 shards cannot split
    ("model", "llama-7b-shape"): {"id": "test/llama-7b-shape", "license": "llama2", "source": {"kind": "local"},
                                  "path": "weights/llama-7b-shape", "digest": "sha256:" + "0" * 64,
                                  "architecture": {"class": "LlamaForCausalLM", "hidden_size": 4096,
                                                   "intermediate_size": 11008, "num_hidden_layers": 32,
                                                   "num_attention_heads": 32, "num_key_value_heads": 8,
                                                   "vocab_size": 32000, "max_position_embeddings": 4096,
                                                   "tie_word_embeddings": False}},
    ("quant", "w4a16-g128"): {"format": "compressed-tensors", "dtype": "bfloat16", "targets": ["Linear"],
                              "ignore": ["lm_head"], "input_activations": None, "algorithm": "rtn",
                              "gptq": None, "kv_cache_scheme": None,
                              "weights": {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True,
                                          "dynamic": False, "group_size": 128}},
    ("parallelism", "tp2"): {"tensor": 2, "pipeline": 1},
    ("parallelism", "tp4"): {"tensor": 4, "pipeline": 1},
    ("parallelism", "pp64"): {"tensor": 1, "pipeline": 64},
}

# (what is wrong, release, overrides, expected fragments of the one error message: file, key, reason)
INCOMPATIBLE = [
    ("fp8 activations on ampere", SMOLLM2_FP8, ["target=vllm-a100"],
     ["specs/target/vllm-a100.yaml", "target.schemes", "does not run w8a8-fp8"]),
    ("tp does not divide kv heads", SMOLLM2_FP8, ["parallelism=tp2"],
     ["specs/parallelism/tp2.yaml", "parallelism.tensor", "num_key_value_heads 3",
      "allowed tensor degrees: 1, 3"]),
    ("context over the model's limit", SMOLLM2_FP8, ["context=32k"],
     ["specs/context/32k.yaml", "context.max_model_len",
      "32768 tokens exceeds the model's max_position_embeddings 8192; allowed: 1 to 8192"]),
    ("context over the limit by override", SMOLLM2_FP8, ["context.max_model_len=9000"],
     ["override 'context.max_model_len=9000'", "context.max_model_len", "9000 tokens exceeds"]),
    ("unsorted buckets", SMOLLM2_FP8, ["context=unsorted"],
     ["specs/context/unsorted.yaml", "context.buckets.prefill", "[1, 512] comes before [1, 128]"]),
    ("bucket longer than the context", SMOLLM2_FP8, ["context=oversized"],
     ["specs/context/oversized.yaml", "context.buckets.prefill.0", "seq 4096 exceeds max_model_len 2048"]),
    ("bucket batch over max_num_seqs", SMOLLM2_FP8, ["context=oversized"],
     ["context.buckets.decode.1", "batch 16 exceeds max_num_seqs 8"]),
    ("prefill chunk under max_num_seqs", SMOLLM2_FP8, ["context=tiny-chunk"],
     ["specs/context/tiny-chunk.yaml", "context.prefill_chunk_size", "32 tokens is less than max_num_seqs 64"]),
    ("model does not fit the device", SMOLLM2_BF16, ["target=gpu-1gib", "context=8k"],
     ["specs/target/gpu-1gib.yaml", "target.device.memory_bytes", "does not fit",
      "weights 269,030,016 B / (TP 1 x PP 1)",
      "2 (K, V) x 30 layers x 3 KV heads x 64 head_dim x 2 B (bfloat16) x 8,192 tokens x 16 sequences"
      " = 3,019,898,880 B", "usable 0.9 x 1,073,741,824 B = 966,367,641 B"]),
    ("more devices than the node has", SMOLLM2_BF16, ["parallelism=tp3"],
     ["specs/parallelism/tp3.yaml", "parallelism.tensor", "3 devices, but the target has 1 per node"]),
    ("pipeline longer than the layers", SMOLLM2_FP8, ["parallelism=pp64"],
     ["specs/parallelism/pp64.yaml", "parallelism.pipeline", "64 exceeds the model's 30 layers"]),
    ("int4 groups do not split across shards", SMOLLM2_FP8, ["model=llama-7b-shape", "quant=w4a16-g128",
                                                             "parallelism=tp4"],
     ["specs/parallelism/tp4.yaml", "parallelism.tensor",
      "4 does not divide the 86 weight groups of mlp.down_proj (in_features 11008 / group_size 128)"]),
    ("runtime range that is not a range", SMOLLM2_FP8, ["target=bad-range"],
     ["specs/target/bad-range.yaml", "target.runtime_versions", "not a PEP 440 version range"]),
]


@pytest.fixture
def repo_with_options(repo):
    for (group, option), content in FILES.items():
        (repo.root / "specs" / group / f"{option}.yaml").write_text(yaml.safe_dump(content))
    return repo


@pytest.mark.parametrize("case", INCOMPATIBLE, ids=[case[0] for case in INCOMPATIBLE])
def test_resolve_rejects_incompatible_choices_with_file_key_and_numbers(repo_with_options, case, monkeypatch,
                                                                       capsys):
    _, release, overrides, expected = case
    monkeypatch.chdir(repo_with_options.root)
    monkeypatch.delenv("BUILDER_ROOT", raising=False)
    assert cli.main(["resolve", release, *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # one problem line names the file, the key and the reason, with its numbers
    assert any(all(fragment in line for fragment in expected) for line in captured.err.splitlines()), captured.err


def test_resolve_exits_2_from_a_real_process_and_reports_every_problem_at_once(repo_with_options):
    result = repo_with_options.run("resolve", SMOLLM2_FP8, "target=vllm-a100", "parallelism=tp2",
                                   "context=unsorted", "context.max_model_len=9000")
    assert result.returncode == 2 and result.stdout == ""
    assert "5 problems" in result.stderr
    for fragment in ("target.schemes", "num_attention_heads 9", "num_key_value_heads 3",
                     "context.buckets.prefill", "9000 tokens exceeds"):
        assert fragment in result.stderr


def test_tp3_fits_smollm2_where_tp2_does_not(repo_with_options):
    spec = resolve(repo_with_options.root, "smollm2-135m-instruct-fp8-dynamic-l4-tp3")
    assert spec["parallelism"]["tensor"] == 3
    with pytest.raises(BuilderError, match="num_key_value_heads 3"):
        resolve(repo_with_options.root, "smollm2-135m-instruct-fp8-dynamic-l4-tp3", ("parallelism=tp2",))


@pytest.mark.parametrize("rope, limit", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    ({"rope_type": "linear", "factor": 2.0}, 16384),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024}, 8192),
    (None, 8192),
])
def test_context_limit_follows_rope_scaling(rope, limit):
    arch = {"max_position_embeddings": 8192, **({"rope_parameters": rope} if rope else {})}
    assert fit.position_limit(arch)[0] == limit


def test_rope_scaled_model_accepts_a_context_beyond_its_base_positions(repo_with_options):
    model = repo_with_options.root / "specs" / "model" / "smollm2-135m-instruct.yaml"
    spec = yaml.safe_load(model.read_text())
    spec["architecture"]["rope_parameters"] = {"rope_type": "linear", "factor": 4.0}
    model.write_text(yaml.safe_dump(spec))
    assert resolve(repo_with_options.root, SMOLLM2_FP8, ("context=32k",))["context"]["max_model_len"] == 32768
    with pytest.raises(BuilderError, match=r"40000 tokens exceeds the model's max_position_embeddings 8192 "
                                           r"x RoPE linear factor 4.0 = 32768; allowed: 1 to 32768"):
        resolve(repo_with_options.root, SMOLLM2_FP8, ("context=32k", "context.max_model_len=40000"))


def test_target_without_fp8_kv_cache_refuses_a_recipe_that_quantizes_it(repo):
    spec = resolve(repo.root, SMOLLM2_BF16)
    spec["quant"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                        "symmetric": True, "dynamic": False, "group_size": None}
    problems = fit.target_problems(spec, Recipe.of(spec["quant"]))
    assert problems == [(("target", "kv_cache_dtypes"), "cpu has no fp8 KV cache (the quant recipe "
                         "quantizes it); allowed: auto")]
    spec["target"] = resolve(repo.root, SMOLLM2_FP8)["target"]
    assert fit.target_problems(spec, Recipe.of(spec["quant"])) == []


def test_cpu_target_refuses_static_activation_scales(repo):
    spec = resolve(repo.root, SMOLLM2_FP8, ("target=cpu",))
    spec["quant"]["input_activations"] = {**spec["quant"]["input_activations"], "dynamic": False,
                                          "strategy": "tensor"}
    (key, message), = fit.target_problems(spec, Recipe.of(spec["quant"]))
    assert key == ("target", "activation_scales") and "static" in message and "allowed: dynamic" in message

