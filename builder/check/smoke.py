"""Smoke check of a staged artifact, run by every build before anything is published: the folder is
loaded the way evaluation loads its format (builder/formats/), with its own tokenizer, and generates a
few tokens greedily from a fixed prompt; a failure is CheckFailed (exit 1), so nothing is published.

    builder build smollm2-135m-instruct-fp8-dynamic      # "smoke: 4 tokens ..." in its log
"""

import time
from pathlib import Path

from builder import formats
from builder.errors import CheckFailed, Problem

PROMPT = "The capital of France is"
NEW_TOKENS = 4  # generated greedily: enough to run prefill and the KV-cache decode path
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# The check loads the whole model in FP32 (4 bytes a parameter), as evaluation does: above this many
# parameters it would set the build's peak memory, which otherwise follows the largest layer, so it
# is skipped (and says so). A layer-at-a-time smoke path would lift the bound.
MAX_PARAMETERS = 400_000_000


def check(folder: Path, shown: str, log=print, parameters: int = 0) -> dict:
    """Load folder (tokenizer and weights), generate NEW_TOKENS greedily and decode them; raise
    CheckFailed naming the file and what failed. Reads only: nothing is written into folder.

    Args:
        folder: the staged (or built) artifact folder.
        shown: the name its problems carry (the artifact's name, not the staging folder's).
        parameters: the source model's parameter count (0: unknown, checked); above MAX_PARAMETERS skipped.
    Returns:
        {prompt, tokens (ids), text, seconds}, for the log; {prompt, skipped, seconds} where transformers
        cannot read what the runtime does (loader_gap: then only the tokenizer is checked).
    """
    if parameters > MAX_PARAMETERS:
        log(f"smoke: skipped: {parameters / 1e9:.2f} B parameters, more than the {MAX_PARAMETERS / 1e9:.1f} B "
            "a whole-model load stays within the build's memory for; `builder eval` loads it in full")
        return {"prompt": PROMPT, "skipped": "model too large for a whole-model load", "seconds": 0.0}
    import torch

    started, threads = time.perf_counter(), torch.get_num_threads()
    # one thread: a few tokens are too little work to split, and on a busy machine two threads wait
    # on each other (a 6 x 1536 x 576 FP32 linear took 22 ms with two here under load, 1 ms with one)
    torch.set_num_threads(1)
    try:
        result = {"prompt": PROMPT, **run(folder, shown)}
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if "skipped" in result:
        log(f"smoke: tokenizer only, generation skipped: {result['skipped']} ({result['seconds']:.1f} s)")
    else:
        log(f"smoke: {len(result['tokens'])} tokens greedily after {PROMPT!r}: {result['text']!r} "
            f"({result['seconds']:.1f} s)")
    return result


def run(folder: Path, shown: str) -> dict:
    """{tokens, text} generated, or {skipped: why} (loader_gap); CheckFailed naming the file and the
    step that failed."""
    from builder.check import evaluate

    fmt, config = attempt(f"{shown}/config.json", "format", lambda: formats.found_in(folder))
    vocabulary, arguments = tokenizer_source(folder, fmt)
    vocabulary, weights = f"{shown}/{vocabulary}", f"{shown}/{weights_file(folder, fmt)}"
    tokenizer = attempt(vocabulary, "tokenizer", lambda: load_tokenizer(folder, arguments))
    gap = loader_gap(folder, config)
    if gap:
        return {"skipped": gap}
    model = attempt(weights, "weights", lambda: in_float32(evaluate.load_model(folder)))
    prompt = attempt(vocabulary, "tokenizer", lambda: encode(tokenizer, model))
    tokens, logits = attempt(weights, "generate", lambda: generate(model, prompt, tokenizer))
    problems = output_problems(weights, logits, tokens)
    if problems:
        raise CheckFailed(problems)
    return {"tokens": tokens, "text": attempt(vocabulary, "decode", lambda: decode(tokenizer, tokens))}


def in_float32(model):
    """model with every floating parameter in FP32: transformers 5.17 leaves a MoE's fused experts and
    routers in BF16 after compressed-tensors dequantizes them (the values are right; an FP32 forward then
    refuses the mixed dtypes). Parameter by parameter, since model.float() is refused for a model
    transformers calls quantized (GGUF, compressed-tensors)."""
    import torch

    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def attempt(file: str, step: str, work):
    """work(), any failure of it (a library's exception included) as CheckFailed naming file and step."""
    try:
        return work()
    except CheckFailed:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the loader raises (BuilderError too), the artifact is broken
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckFailed(Problem(file, f"smoke.{step}", f"{type(error).__name__}: {message[:300]}")) from None


def loader_gap(folder: Path, config: dict | None) -> str | None:
    """Why transformers, which every format's load goes through, cannot read this artifact although its
    runtime does (then only the tokenizer is checked), or None. One known case: INT8 (not packed)
    compressed-tensors experts, which transformers 5.17 and 5.24 do not dequantize (their MoE weight
    converter expects weight_packed); vLLM loads those names (tests/test_families.py)."""
    from builder.tensorfile import read_header

    quantization = (config or {}).get("quantization_config", {})
    if quantization.get("quant_method") != "compressed-tensors" or quantization.get("format") != "int-quantized":
        return None
    if any(".experts." in name for file in sorted(folder.glob("*.safetensors")) for name in read_header(file)):
        return "transformers does not dequantize INT8 experts (int-quantized); vLLM loads them"
    return None


def tokenizer_source(folder: Path, fmt) -> tuple:
    """(the file a tokenizer problem names, from_pretrained's extra arguments): a GGUF file carries its
    vocabulary in its tokenizer.ggml.* keys, which transformers reads with gguf_file= as llama.cpp does;
    a safetensors artifact carries the tokenizer files beside the weights."""
    if fmt.CONTAINER != formats.SAFETENSORS:
        name = weights_file(folder, fmt)
        return name, {"gguf_file": name}
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return (present[0] if present else TOKENIZER_FILES[0]), {}


def weights_file(folder: Path, fmt) -> str:
    """The first weights file of the folder (what a weights problem names)."""
    found = sorted(folder.glob(f"*{fmt.CONTAINER}"))
    return found[0].name if found else f"*{fmt.CONTAINER}"


def load_tokenizer(folder: Path, arguments: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **arguments)


def encode(tokenizer, model) -> list:
    """The prompt's ids, each inside the model's embedding. A vocabulary that holds none of the prompt
    (a BPE without byte fallback over other words) starts from its first special token inside the
    embedding instead: what is checked is that the artifact loads, runs and decodes, not the words."""
    ids = tokenizer(PROMPT)["input_ids"]
    rows = model.get_input_embeddings().num_embeddings
    if not ids:
        special = (tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids = [token for token in special if token is not None and token < rows][:1]
    if not ids or max(ids) >= rows:
        raise ValueError(f"the prompt encodes to {ids}, outside the model's {rows} embedding rows")
    return ids


def generate(model, ids: list, tokenizer) -> tuple:
    """(NEW_TOKENS greedy ids, the logits of each step) through the model's own generate (KV cache on)."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=pad if pad is not None else 0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=settings)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)


def output_problems(where: str, logits, tokens: list) -> list:
    """A Problem when a step's logits hold NaN or infinity, or nothing was generated."""
    import torch

    problems = []
    if not tokens:
        problems.append(Problem(where, "smoke.generate", "generated no token"))
    bad = (~torch.isfinite(logits)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        problems.append(Problem(where, "smoke.generate", f"logits hold NaN or infinity at generated token "
                                f"{bad[0] + 1} of {len(logits)}"))
    return problems


def decode(tokenizer, tokens: list) -> str:
    """The generated text; every id must be one the tokenizer knows."""
    unknown = [token for token in tokens if token >= len(tokenizer)]
    if unknown:
        raise ValueError(f"generated id {unknown[0]}, beyond the tokenizer's {len(tokenizer)} tokens")
    return tokenizer.decode(tokens)
