"""Calibration and evaluation samples: local text or JSON lines, tokenized, windowed, seeded. Deterministic.

    samples(root, spec["calibration"], tokenizer_dir, file="specs/calibration/licenses.yaml")
"""

import json
import random
from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.paths import inside

FORMATS = {".txt": "text", ".jsonl": "jsonl"}
TEXT_FIELD = "text"    # JSON-lines key holding a record's text
SPLIT_FIELD = "split"  # JSON-lines key naming a record's split


def documents(path: Path, split: str | None, *, file: str, group: str) -> list:
    """The texts of a data file, in file order: a .txt is one document, a .jsonl one per record."""
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise BuilderError(Problem(file, f"{group}.dataset", f"{path.name}: unknown format; "
                                   f"allowed suffixes: {', '.join(sorted(FORMATS))}"))
    if kind == "text":
        if split is not None:
            raise BuilderError(Problem(file, f"{group}.split", f"{split!r}: a .txt file has no splits; use null"))
        return [path.read_text(encoding="utf-8")]
    found, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[TEXT_FIELD]
        except (ValueError, KeyError, TypeError):
            problems.append(Problem(f"{path.name}:{number}", TEXT_FIELD,
                                    f'not a JSON object with a "{TEXT_FIELD}" string'))
            continue
        if split is None or record.get(SPLIT_FIELD) == split:
            found.append(text)
    if problems:
        raise BuilderError(problems)
    if not found:
        raise BuilderError(Problem(file, f"{group}.split", f"{split!r}: no records of that split in {path.name}"))
    return found


def token_windows(texts: list, tokenizer, length: int) -> list:
    """Non-overlapping windows of exactly length tokens over the documents joined end to end."""
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)  # a document boundary the model knows
    return [ids[start:start + length] for start in range(0, len(ids) - length + 1, length)]


def choose(count: int, available: int, seed: int) -> list:
    """count window indices out of available, drawn with an explicit seed, in ascending order."""
    return sorted(random.Random(seed).sample(range(available), count))


def samples(root: Path, group_spec: dict, tokenizer_dir: Path, *, file: str, group: str):
    """The token ids a calibration or evaluation spec selects, as a LongTensor [samples, sequence_length].

    Args:
        root: repository root; group_spec["dataset"] is relative to it.
        group_spec: a resolved calibration/ or eval/ group (dataset, split, samples, sequence_length, seed).
        tokenizer_dir: folder with the model's tokenizer files.
        file, group: where the spec came from, for error messages.
    """
    import torch
    from transformers import AutoTokenizer

    path = inside(root, group_spec["dataset"], file=file, key=f"{group}.dataset")
    if not path.is_file():
        raise BuilderError(Problem(file, f"{group}.dataset", f"{group_spec['dataset']!r}: no such file"))
    texts = documents(path, group_spec["split"], file=file, group=group)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    windows = token_windows(texts, tokenizer, group_spec["sequence_length"])
    if group_spec["samples"] > len(windows):
        raise BuilderError(Problem(file, f"{group}.samples", f"{group_spec['samples']}: {group_spec['dataset']} "
                                   f"holds only {len(windows)} windows of {group_spec['sequence_length']} "
                                   "tokens; lower samples or sequence_length"))
    chosen = choose(group_spec["samples"], len(windows), group_spec["seed"])
    return torch.tensor([windows[i] for i in chosen], dtype=torch.long)
