"""Load one artifact in llama.cpp (llama-cpp-python) or mlx-lm, generate greedily and score token
windows; run inside the runtime's own venv (it imports nothing from the builder).

    /work/venvs/llama/bin/python bench/ondevice_runtime.py llama ARTIFACT_DIR JOB.json OUT.json
    /work/venvs/mlx/bin/python bench/ondevice_runtime.py mlx ARTIFACT_DIR JOB.json OUT.json

JOB.json: {"windows": [[token ids], ...], "logits": false, "prompts": {"completion": str, "chat": str},
"max_tokens": 32}.
OUT.json: load seconds, the runtime's version (llama.cpp), the greedy completions, per-window summed NLL (nats) and token counts, and
(with "logits") every window's logits. bench/ondevice.py writes the jobs and reads the results.
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

MAX_TOKENS = 32


def nll(logits: np.ndarray, ids: list) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    logits = logits[: len(ids) - 1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_norm - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def llama_version() -> dict:
    """llama-cpp-python's version, and the version and commit its ggml library was built from (as ggml
    reports them: "unknown" when the build did not see llama.cpp's git history), and the CPU features used."""
    import ctypes

    import llama_cpp

    found = {"llama_cpp_python": llama_cpp.__version__,
             "system_info": llama_cpp.llama_print_system_info().decode().strip()}
    for library in sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*")):
        ggml = ctypes.CDLL(str(library))
        for name in ("ggml_version", "ggml_commit"):
            if hasattr(ggml, name):
                function = getattr(ggml, name)
                function.restype = ctypes.c_char_p
                found[name] = function().decode()
    return found


def llama(artifact: Path, job: dict) -> dict:
    from llama_cpp import Llama

    longest = max((len(w) for w in job["windows"]), default=0)
    start = time.perf_counter()
    model = Llama(model_path=str(next(artifact.glob("*.gguf"))), n_ctx=max(512, longest + 8), n_batch=512,
                  n_threads=2, logits_all=True, verbose=False, seed=0)
    found = {"load_s": time.perf_counter() - start, "windows": [], "runtime": llama_version()}
    for window in job["windows"]:
        model.reset()
        model.eval(window)
        logits = np.asarray(model.scores[: len(window)], dtype=np.float32)
        found["windows"].append({"nll": nll(logits, window), "tokens": len(window) - 1,
                                 **({"logits": logits.tolist()} if job.get("logits") else {})})
    prompts = job.get("prompts", {})
    if "completion" in prompts:
        start = time.perf_counter()
        out = model.create_completion(prompts["completion"], max_tokens=job.get("max_tokens", MAX_TOKENS),
                                      temperature=0.0, top_k=1)
        found["completion"] = {"text": out["choices"][0]["text"], "seconds": time.perf_counter() - start}
    if "chat" in prompts:
        start = time.perf_counter()
        out = model.create_chat_completion([{"role": "user", "content": prompts["chat"]}],
                                           max_tokens=job.get("max_tokens", MAX_TOKENS),
                                           temperature=0.0, top_k=1)
        found["chat"] = {"text": out["choices"][0]["message"]["content"], "seconds": time.perf_counter() - start,
                         "finish": out["choices"][0]["finish_reason"]}
    return found


def mlx(artifact: Path, job: dict) -> dict:
    import mlx.core as mx
    from mlx_lm import generate, load

    start = time.perf_counter()
    model, tokenizer = load(str(artifact))
    found = {"load_s": time.perf_counter() - start, "windows": [], "windows_fp32": []}
    for key, cast in (("windows", False), ("windows_fp32", job.get("fp32", False))):
        if key == "windows_fp32" and not cast:
            continue
        if cast:  # MLX's CPU matmuls accumulate in the model's dtype (bf16); FP32 scales and biases are exact
            model.set_dtype(mx.float32)
        for window in job["windows"]:
            logits = np.array(model(mx.array([window]))[0].astype(mx.float32))
            found[key].append({"nll": nll(logits, window), "tokens": len(window) - 1,
                               **({"logits": logits.tolist()} if job.get("logits") else {})})
    if cast:
        model, tokenizer = load(str(artifact))  # generate as stored
    prompts = job.get("prompts", {})
    if "completion" in prompts:
        start = time.perf_counter()
        text = generate(model, tokenizer, prompt=prompts["completion"], max_tokens=job.get("max_tokens", MAX_TOKENS))
        found["completion"] = {"text": text, "seconds": time.perf_counter() - start}
    if "chat" in prompts and getattr(tokenizer, "chat_template", None):  # tiny test models have none
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompts["chat"]}],
                                               add_generation_prompt=True)
        start = time.perf_counter()
        found["chat"] = {"text": generate(model, tokenizer, prompt=prompt, max_tokens=job.get("max_tokens", MAX_TOKENS)),
                         "seconds": time.perf_counter() - start}
    return found


if __name__ == "__main__":
    runtime, artifact, job_file, out_file = sys.argv[1:5]
    job = json.loads(Path(job_file).read_text())
    result = {"llama": llama, "mlx": mlx}[runtime](Path(artifact), job)
    for key in ("windows", "windows_fp32"):
        rows = result.get(key) or []
        if rows:
            result[key.replace("windows", "perplexity")] = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    Path(out_file).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("windows")}), file=sys.stderr)
