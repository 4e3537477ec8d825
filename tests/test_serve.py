"""serve.json: the runtime arguments and command line each shipped release is meant to be served with."""

import shlex

import pytest

from builder.release import lock
from builder.release.release import Release
from builder.release.resolve import list_releases
from builder.artifact.serve import serve_config
from conftest import PROJECT

RELEASES = list_releases(PROJECT)
VLLM_RELEASES = [r for r in RELEASES if lock.read(PROJECT, r)["spec"]["target"]["runtime"] == "vllm"]


@pytest.mark.parametrize("release", VLLM_RELEASES)
def test_serve_arguments_carry_the_release_layout_and_context(release):
    locked = lock.committed(PROJECT, release)
    spec, serve = locked.spec.data(), serve_config(locked)
    arguments = serve["arguments"]
    assert serve["runtime"] == "vllm" and serve["model"] == f"artifacts/{release}"
    assert arguments["tensor_parallel_size"] == spec["parallelism"]["tensor"]
    assert arguments["pipeline_parallel_size"] == spec["parallelism"]["pipeline"]
    assert arguments["max_model_len"] == spec["context"]["max_model_len"]
    assert arguments["max_num_seqs"] == spec["context"]["max_num_seqs"]
    assert arguments["max_num_batched_tokens"] == spec["context"]["prefill_chunk_size"]
    assert arguments["kv_cache_dtype"] == ("fp8" if spec["quant"]["kv_cache_scheme"] else "auto")
    assert ("quantization" in arguments) == (spec["quant"]["format"] != "dense")
    assert f"--tensor-parallel-size {spec['parallelism']['tensor']}" in serve["command"]
    assert f"vllm serve artifacts/{release} " in serve["command"]


def test_l4_tp3_release_serves_across_three_gpus_with_its_full_context():
    serve = serve_config(lock.committed(PROJECT, "smollm2-135m-instruct-fp8-dynamic-l4-tp3"))
    assert serve["environment"] == {}
    assert serve["command"] == (
        "vllm serve artifacts/smollm2-135m-instruct-fp8-dynamic-l4-tp3 --dtype bfloat16 --enable-chunked-prefill"
        " --gpu-memory-utilization 0.9 --kv-cache-dtype auto --max-model-len 8192 --max-num-batched-tokens 2048"
        " --max-num-seqs 16 --pipeline-parallel-size 1 --quantization compressed-tensors"
        " --served-model-name smollm2-135m-instruct-fp8-dynamic-l4-tp3 --tensor-parallel-size 3")


def test_a100_pp2_release_serves_as_two_pipeline_stages_without_quantization():
    arguments = serve_config(lock.committed(PROJECT, "smollm2-135m-instruct-bf16-a100-pp2"))["arguments"]
    assert arguments["pipeline_parallel_size"] == 2 and arguments["tensor_parallel_size"] == 1
    assert "quantization" not in arguments and arguments["dtype"] == "bfloat16"


def test_cpu_release_sizes_vllm_cpu_kv_cache_and_takes_no_gpu_arguments():
    serve = serve_config(lock.committed(PROJECT, "smollm2-135m-instruct-bf16"))
    # 2 x 30 layers x 3 KV heads x 64 x 2 B x 2048 tokens x 8 sequences = 360 MiB: rounded up to 1 GiB
    assert serve["environment"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "gpu_memory_utilization" not in serve["arguments"]
    assert serve["command"].startswith("VLLM_CPU_KVCACHE_SPACE=1 vllm serve artifacts/smollm2-135m-instruct-bf16 ")


def test_a_build_with_overrides_names_its_own_artifact_folder():
    entry = {**lock.read(PROJECT, "smollm2-135m-instruct-bf16"), "overrides": ["context.max_num_seqs=4"]}
    prefix = entry["artifact_id"].split(":")[1][:12]
    assert serve_config(Release.from_entry(entry))["model"] == f"artifacts/smollm2-135m-instruct-bf16-{prefix}"


def test_a_transformers_target_gets_a_from_pretrained_command():
    entry = lock.read(PROJECT, "smollm2-135m-instruct-bf16")
    entry["spec"]["target"]["runtime"] = "transformers"
    serve = serve_config(Release.from_entry(entry))
    assert serve["arguments"] == {"dtype": "bfloat16"} and serve["environment"] == {}
    assert shlex.split(serve["command"]) == [
        "python", "-c", "from transformers import pipeline; pipeline('text-generation', "
        "model='artifacts/smollm2-135m-instruct-bf16', dtype='bfloat16')"]


def test_llama_cpp_release_serves_its_gguf_file_with_a_context_for_every_sequence():
    serve = serve_config(lock.committed(PROJECT, "smollm2-135m-instruct-gguf-q4_0"))
    gguf = "artifacts/smollm2-135m-instruct-gguf-q4_0/smollm2-135m-instruct-gguf-q4_0.gguf"
    assert serve["runtime"] == "llama-cpp" and serve["model"] == gguf and serve["environment"] == {}
    # llama-server splits --ctx-size into --parallel slots: 8 sequences of 2048 tokens
    assert serve["command"] == f"llama-server -m {gguf} --ctx-size 16384 --parallel 8 --ubatch-size 512"
    assert serve["try"] == f"llama-cli -m {gguf} -p 'What is the capital of France?' -n 64 --temp 0 -st"


def test_mlx_release_serves_its_folder_with_mlx_lm():
    serve = serve_config(lock.committed(PROJECT, "smollm2-135m-instruct-mlx-4bit"))
    folder = "artifacts/smollm2-135m-instruct-mlx-4bit"
    assert serve["runtime"] == "mlx" and serve["model"] == folder
    assert serve["command"] == f"mlx_lm.server --model {folder} --decode-concurrency 8 --prefill-step-size 512"
    assert serve["try"].startswith(f"mlx_lm.generate --model {folder} --prompt ")
