"""Evaluation and the quality gate: figures in eval.json, a missed gate fails the build and leaves nothing."""

import json

from builder import build as build_module
from builder.check import evaluate

EVAL = ("eval=docstrings", "eval.samples=2", "eval.sequence_length=32")


def test_a_build_with_an_eval_group_writes_eval_json_with_perplexity_and_kl(calib_repo, tmp_path):
    manifest = build_module.build(calib_repo.root, "tiny-llama-fp8-dynamic", EVAL, out=tmp_path / "a",
                                  log=lambda message: None)
    assert "eval.json" in {entry["path"] for entry in manifest["files"]}
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert result["tokens"] == 2 * 31 and result["dataset"] == "data/eval.txt"
    assert result["perplexity"]["source"] > 1 and result["perplexity"]["artifact"] > 1
    assert 0 <= result["mean_kl"] < 0.05 and result["gate"]["passed"] is True
    # KL of a model against itself is zero: the source measured as its own artifact
    same = evaluate.measure(calib_repo.root / "weights" / "tiny-llama", calib_repo.root / "weights" / "tiny-llama",
                            __import__("torch").tensor([[1, 2, 3, 4, 5, 6]]))
    assert same["mean_kl"] == 0 and same["perplexity_increase_pct"] == 0


def test_a_build_that_misses_its_gate_exits_1_naming_the_figure_and_leaves_no_artifact(calib_repo, tmp_path):
    out = tmp_path / "artifacts" / "gated"
    result = calib_repo.run("build", "tiny-llama-fp8-dynamic", *EVAL, "eval.gate.max_mean_kl=0.0",
                            "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert "override 'eval.gate.max_mean_kl=0.0': eval.gate.max_mean_kl: mean_kl" in result.stderr
    assert "exceeds the gate's 0.0" in result.stderr
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [".gated.lock"]


def test_a_missed_gate_names_the_release_file_that_set_it_not_the_eval_group(calib_repo, tmp_path):
    # shipped releases set their own gates over the eval group's: the error must send the user there
    release = calib_repo.root / "specs" / "release" / "tiny-llama-fp8-dynamic-gated.yaml"
    text = (calib_repo.root / "specs" / "release" / "tiny-llama-fp8-dynamic.yaml").read_text()
    release.write_text(text.replace("name: tiny-llama-fp8-dynamic\n", "name: tiny-llama-fp8-dynamic-gated\n")
                       + "\neval:\n  gate:\n    max_perplexity_increase_pct: 100.0\n    max_mean_kl: 0.0\n")
    named = "specs/release/tiny-llama-fp8-dynamic-gated.yaml: eval.gate.max_mean_kl: mean_kl"
    try:
        built = calib_repo.run("build", "tiny-llama-fp8-dynamic-gated", *EVAL, "--out", str(tmp_path / "gated"))
        # the same release built without measuring, then measured by `builder eval --eval docstrings`
        ungated = calib_repo.run("build", "tiny-llama-fp8-dynamic-gated", "eval=none", "--out", str(tmp_path / "a"))
        measured = calib_repo.run("eval", str(tmp_path / "a"), "--eval", "docstrings", "--out", str(tmp_path / "e"))
    finally:
        release.unlink()
    assert built.returncode == 1 and named in built.stderr and "specs/eval/" not in built.stderr, built.stderr
    assert not (tmp_path / "gated").exists()
    assert ungated.returncode == 0, ungated.stderr
    assert measured.returncode == 1 and named in measured.stderr and "specs/eval/" not in measured.stderr, measured
