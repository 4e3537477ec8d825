"""Calibration and evaluation samples: deterministic, seeded, split-aware, with clear errors."""

import json

import pytest

from builder.source import data
from builder.errors import BuilderError


@pytest.fixture
def tokenizer_dir(calib_repo):
    return calib_repo.root / "weights" / "tiny-llama"


def group(dataset, **changes):
    return {"dataset": dataset, "split": None, "samples": 4, "sequence_length": 16, "seed": 0, **changes}


def test_samples_are_the_same_on_every_call_and_change_with_the_seed(calib_repo, tokenizer_dir):
    spec = group("data/calibration.txt")
    first = data.samples(calib_repo.root, spec, tokenizer_dir, file="f", group="calibration")
    again = data.samples(calib_repo.root, spec, tokenizer_dir, file="f", group="calibration")
    other = data.samples(calib_repo.root, {**spec, "seed": 1}, tokenizer_dir, file="f", group="calibration")
    assert first.shape == (4, 16) and first.equal(again) and not first.equal(other)


def test_jsonl_split_selects_records_and_a_missing_split_is_named(calib_repo, tokenizer_dir, tmp_path):
    lines = [{"text": "alpha " * 40, "split": "train"}, {"text": "omega " * 40, "split": "test"}]
    path = calib_repo.root / "data" / "tiny.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    train = data.samples(calib_repo.root, group("data/tiny.jsonl", split="train", samples=2), tokenizer_dir,
                         file="f", group="calibration")
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tokenizer_dir).decode(train.flatten().tolist())
    assert "alpha" in text and "omega" not in text
    assert data.documents(path, "test", file="f", group="eval") == ["omega " * 40]
    with pytest.raises(BuilderError, match="calibration.split.*'dev'"):
        data.documents(path, "dev", file="f", group="calibration")


def test_asking_for_more_samples_than_the_text_holds_names_the_key(calib_repo, tokenizer_dir):
    with pytest.raises(BuilderError, match="eval.samples: 100000: data/eval.txt holds only"):
        data.samples(calib_repo.root, group("data/eval.txt", samples=100000), tokenizer_dir, file="f", group="eval")


def test_a_split_on_a_plain_text_file_is_refused(calib_repo, tokenizer_dir):
    with pytest.raises(BuilderError, match="a .txt file has no splits"):
        data.samples(calib_repo.root, group("data/eval.txt", split="train"), tokenizer_dir, file="f", group="eval")
