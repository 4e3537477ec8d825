"""Checks at onboarding (`builder model add`) beyond what a build checks: config.json's model_type
agrees with its architectures, the tokenizer parses and its ids fit the embedding, and every weight is
finite, checked in the same read of each file that computes the folder's digest.

    from builder.source import checks
    entries = checks.digest_entries(folder, files, "downloads/qwen3")   # canonical.file_entries' rows
"""

import hashlib
import json
from pathlib import Path

from builder.canonical import HASH_THREADS, PARALLEL_BYTES, file_entry
from builder.errors import BuilderError, Problem
from builder.tensorfile import ELEMENT_BYTES, header_and_start

CHUNK = 16 << 20  # bytes read, hashed and checked at a time: a multiple of every element size
FLOATING = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # can hold NaN/inf
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def label_problems(config: dict, shown: str) -> list:
    """A Problem when architectures names another class than the one transformers builds for model_type
    (a Granite relabelled as Llama would load as Llama in vLLM, without Granite's multipliers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLASSES

    model_type, named = config.get("model_type"), (config.get("architectures") or [None])[0]
    expected = CLASSES.get(model_type)
    if expected is None or named is None or named == expected:
        return []  # a model_type transformers does not know is refused by the architecture check
    owners = sorted(kind for kind, cls in CLASSES.items() if cls == named)
    owner = f" (transformers pairs {named} with model_type {owners[0]!r})" if owners else ""
    return [Problem(f"{shown}/config.json", "model_type", f"{model_type!r} builds {expected}, but architectures "
                    f"names {named}{owner}; correct whichever is wrong before onboarding")]


def tokenizer_problems(folder: Path, config: dict, shown: str) -> list:
    """Problems with the tokenizer: each JSON file must parse, transformers must load it, and every id it
    produces (vocabulary and added tokens) must have a row in the embedding (config.json's vocab_size).

    Rows beyond the tokenizer's last id are padding (Qwen2.5 pads 151,665 ids to 151,936 rows, Phi-3
    32,011 to 32,064: kernels like multiples of 64 or 128) and are accepted; a tokenizer that reaches
    less than half the rows is another model's, and is refused."""
    problems = []
    for name in TOKENIZER_JSON:
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            problems.append(Problem(f"{shown}/{name}", "", f"not JSON ({error})"))
    if problems:
        return problems
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        vocabulary = tokenizer.get_vocab()
    except Exception as error:  # noqa: BLE001 - whatever the loader raises, a build could not tokenize
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return [Problem(f"{shown}/tokenizer.json", "", f"transformers cannot load the tokenizer "
                        f"({type(error).__name__}: {first[:300]})")]
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not rows or not vocabulary:
        return [Problem(f"{shown}/tokenizer.json", "", "the tokenizer has no tokens")] if not vocabulary else []
    token, highest = max(vocabulary.items(), key=lambda item: item[1])
    if highest >= rows:
        problems.append(Problem(f"{shown}/tokenizer.json", "", f"token {token!r} has id {highest}, but the "
                                f"embedding has {rows} rows (config.json vocab_size): a tokenizer of another model?"))
    elif highest + 1 < rows / 2:
        problems.append(Problem(f"{shown}/tokenizer.json", "", f"{len(vocabulary)} tokens (highest id {highest}) "
                                f"for an embedding of {rows} rows (config.json vocab_size): a tokenizer of "
                                "another model?"))
    return problems


def digest_entries(folder: Path, relatives: list, shown: str) -> list:
    """canonical.file_entries' rows ({path, sha256, size}) of the given files under folder, each file read
    once: a safetensors file's floating tensors are checked finite from the same bytes that are hashed.
    Raises BuilderError (exit 2) naming every file and tensor that holds NaN or infinity."""
    import torch

    def one(relative):
        return scanned(folder, relative, shown)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # files are checked side by side instead, as canonical.file_entries hashes them
    try:
        if len(relatives) > 1 and sum((folder / r).stat().st_size for r in relatives) > PARALLEL_BYTES:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(HASH_THREADS) as pool:  # sha256, reads and torch release the GIL
                results = list(pool.map(one, relatives))
        else:
            results = [one(relative) for relative in relatives]
    finally:
        torch.set_num_threads(threads)
    problems = [problem for _, found in results for problem in found]
    if problems:
        raise BuilderError(problems)
    return [entry for entry, _ in results]


def scanned(folder: Path, relative: str, shown: str) -> tuple:
    """(entry, problems) of one file: its sha256 and size, and for safetensors a Problem per tensor that
    holds NaN or infinity; the file is read once, in order, CHUNK bytes at a time."""
    path = folder / relative
    if not relative.endswith(".safetensors"):
        return file_entry(folder, relative), []
    header, start = header_and_start(path)  # its length and JSON checked against the file's size
    size = path.stat().st_size
    spans = sorted((start + info["data_offsets"][0], start + info["data_offsets"][1], name, info["dtype"])
                   for name, info in header.items())
    sha, view, problems, position = hashlib.sha256(), memoryview(bytearray(CHUNK)), [], 0
    with open(path, "rb") as handle:
        for begin, end, name, code in [*spans, (size, size, None, None)]:
            if begin < position:
                problems.append(Problem(f"{shown}/{relative}", name, "its data overlaps another tensor's"))
                continue
            position, _ = through(handle, sha, view, position, begin, None)  # the header, or bytes between tensors
            position, bad = through(handle, sha, view, position, end, code)
            if bad:
                problems.append(Problem(f"{shown}/{relative}", name, f"holds {bad}: every source weight must "
                                        "be finite (a NaN or infinity reaches every output it touches)"))
    return {"path": relative, "sha256": "sha256:" + sha.hexdigest(), "size": size}, problems


def through(handle, sha, view: memoryview, position: int, end: int, code: str | None) -> tuple:
    """Read the file on from position to end, hashing every byte; (end, None, "NaN" or "infinity"): the
    values of a floating dtype code checked on the way (any other code, or None, is only hashed)."""
    import torch

    dtype, bad = getattr(torch, FLOATING[code]) if code in FLOATING else None, None
    while position < end:
        count = read_fully(handle, view[: min(len(view), end - position)])
        sha.update(view[:count])
        if dtype is not None and bad is None:
            values = torch.frombuffer(view, dtype=dtype, count=count // ELEMENT_BYTES[code])
            low, high = torch.aminmax(values)  # a NaN anywhere makes both NaN; an infinity is an extreme
            bad = "NaN" if low.isnan() else "infinity" if low.isinf() or high.isinf() else None
        position += count
    return position, bad


def read_fully(handle, into: memoryview) -> int:
    """Fill into from handle (reads may return short); the file must not end first."""
    done = 0
    while done < len(into):
        count = handle.readinto(into[done:])
        if not count:
            raise BuilderError(Problem(Path(handle.name).name, "", "ends early (changed while being read?)"))
        done += count
    return done
