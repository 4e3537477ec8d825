"""serve.json: the runtime arguments a release is meant to be served with, and the command line. Pure.

    builder build smollm2-135m-instruct-fp8-dynamic && cat artifacts/smollm2-135m-instruct-fp8-dynamic/serve.json
"""

import shlex

from builder import formats
from builder.release import memory
from builder.release.recipe import Recipe
from builder.release.release import Release


def vllm_arguments(spec: dict, recipe: Recipe, figures: dict) -> tuple:
    """(engine arguments by vLLM's names, environment variables) for `vllm serve`."""
    context, target = spec["context"], spec["target"]
    arguments = {
        "dtype": recipe.dtype,
        "enable_chunked_prefill": True,
        "kv_cache_dtype": figures["kv_cache_dtype"],
        "max_model_len": context["max_model_len"],
        "max_num_batched_tokens": context["prefill_chunk_size"],
        "max_num_seqs": context["max_num_seqs"],
        "pipeline_parallel_size": spec["parallelism"]["pipeline"],
        "quantization": formats.of(recipe.format).VLLM,  # none for dense checkpoints
        "served_model_name": spec["release"]["name"],
        "tensor_parallel_size": spec["parallelism"]["tensor"],
    }
    environment = {}
    if target["device"]["kind"] == "cuda":
        arguments["gpu_memory_utilization"] = target["memory_utilization"]
    else:  # vLLM's CPU build sizes its KV cache from this variable, in GiB
        environment["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, -(-figures["kv_cache_per_device"] // memory.GIB)))
    return {k: v for k, v in arguments.items() if v is not None}, environment


def vllm_command(model: str, arguments: dict, environment: dict) -> str:
    """`vllm serve MODEL --flag value ...`, flags sorted, booleans as bare flags."""
    words = [f"{key}={shlex.quote(value)}" for key, value in sorted(environment.items())]
    return flags([*words, "vllm", "serve", shlex.quote(model)], arguments)


def transformers_arguments(spec: dict, recipe: Recipe, figures: dict) -> tuple:
    """from_pretrained arguments for plain transformers serving (no environment)."""
    return {"dtype": recipe.dtype}, {}


def transformers_command(model: str, arguments: dict, environment: dict) -> str:
    code = (f"from transformers import pipeline; pipeline('text-generation', model={model!r}, "
            f"dtype={arguments['dtype']!r})")
    return f"python -c {shlex.quote(code)}"


def flags(words: list, arguments: dict) -> str:
    """words, then --flag value for each argument (sorted; booleans as bare flags), shell-quoted."""
    for key, value in sorted(arguments.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def llama_cpp_arguments(spec: dict, recipe: Recipe, figures: dict) -> tuple:
    """llama-server's options: its context holds every sequence's tokens (it splits it into
    --parallel slots), so the KV cache is the one the memory estimate counts."""
    context = spec["context"]
    return {"ctx_size": context["max_model_len"] * context["max_num_seqs"], "parallel": context["max_num_seqs"],
            "ubatch_size": context["prefill_chunk_size"]}, {}


def llama_cpp_command(model: str, arguments: dict, environment: dict) -> str:
    return flags(["llama-server", "-m", shlex.quote(model)], arguments)


def mlx_arguments(spec: dict, recipe: Recipe, figures: dict) -> tuple:
    """mlx_lm.server's options: sequences decoded together, prefill step."""
    context = spec["context"]
    return {"decode_concurrency": context["max_num_seqs"], "prefill_step_size": context["prefill_chunk_size"]}, {}


def mlx_command(model: str, arguments: dict, environment: dict) -> str:
    return flags(["mlx_lm.server", "--model", shlex.quote(model)], arguments)


RUNTIMES = {"vllm": (vllm_arguments, vllm_command), "transformers": (transformers_arguments, transformers_command),
            "llama-cpp": (llama_cpp_arguments, llama_cpp_command), "mlx": (mlx_arguments, mlx_command)}
# One greedy completion from the command line, for runtimes that have such a tool (the model card shows it).
PROMPT = "What is the capital of France?"
TRY = {"llama-cpp": lambda model: f"llama-cli -m {shlex.quote(model)} -p {shlex.quote(PROMPT)} -n 64 --temp 0 -st",
       "mlx": lambda model: f"mlx_lm.generate --model {shlex.quote(model)} --prompt {shlex.quote(PROMPT)} --max-tokens 64"}


def model_path(release: Release) -> str:
    """What the runtime is pointed at: the artifact folder, or the file of a format with a container of its own."""
    folder = f"artifacts/{release.artifact_name}"
    fmt = formats.of(release.spec.quant.format)
    if fmt.CONTAINER != formats.SAFETENSORS:
        return f"{folder}/{fmt.file_name(release.spec.data())}"
    return folder


def serve_config(release: Release) -> dict:
    """What serve.json holds for a release: runtime, version range, model folder, arguments, command."""
    spec, recipe = release.spec.data(), release.recipe
    runtime = spec["target"]["runtime"]
    to_arguments, to_command = RUNTIMES[runtime]
    arguments, environment = to_arguments(spec, recipe, memory.estimate(spec, recipe))
    model = model_path(release)
    config = {"runtime": runtime, "runtime_versions": spec["target"]["runtime_versions"], "model": model,
              "arguments": arguments, "environment": environment,
              "command": to_command(model, arguments, environment)}
    if runtime in TRY:
        config["try"] = TRY[runtime](model)
    return config
