"""The Python API as docs/api.md shows it: its example runs, on a tiny model, as written."""

import re

import pytest

from builder.canonical import pretty_json
from builder.errors import BuilderError
from builder.release.lock import committed, locked
from builder.release.resolve import resolve_spec
from conftest import PROJECT

DOCUMENTED = "smollm2-135m-instruct-fp8-dynamic"


def example() -> str:
    """The Python block of docs/api.md."""
    blocks = re.findall(r"```python\n(.*?)```", (PROJECT / "docs" / "api.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_example_resolves_locks_builds_and_verifies_a_release(repo, monkeypatch, capsys):
    repo.add_model("tiny-llama")
    monkeypatch.chdir(repo.root)
    monkeypatch.delenv("BUILDER_ROOT", raising=False)
    code = example()
    assert DOCUMENTED in code
    namespace = {}
    exec(compile(code.replace(DOCUMENTED, "tiny-llama-fp8-dynamic"), "docs/api.md", "exec"), namespace)
    release = namespace["release"]
    assert (repo.root / "artifacts" / release.artifact_name / "manifest.json").is_file()
    assert namespace["spec"].eval.dataset == "data/eval.txt" and release.spec.eval.dataset is None
    printed = capsys.readouterr().out
    assert release.artifact_id in printed and "fp8, channel, symmetric, static scales" in printed


def test_the_documented_release_is_shipped():
    assert resolve_spec(PROJECT, DOCUMENTED).release.name == DOCUMENTED


def test_committed_reads_back_the_release_a_lock_file_holds(repo):
    repo.add_model("tiny-llama")
    release = locked(repo.root, "tiny-llama-bf16")
    (repo.root / "locks").mkdir()
    (repo.root / release.lock_file).write_text(pretty_json(release.to_entry()), encoding="utf-8")
    assert committed(repo.root, "tiny-llama-bf16") == release
    assert committed(repo.root, "no-such-release") is None


def test_resolve_spec_raises_every_problem_with_its_file(repo):
    with pytest.raises(BuilderError) as caught:
        resolve_spec(repo.root, DOCUMENTED, ("quant.weights.num_bits=3", "+quant.bogus=1"))
    where = sorted(problem.file for problem in caught.value.problems)
    assert where == ["override '+quant.bogus=1'", "override 'quant.weights.num_bits=3'"]
