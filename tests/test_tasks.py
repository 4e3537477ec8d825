"""Task accuracy through lm-evaluation-harness: both models scored alike, recovery gated per task, the task's
files pinned in the artifact_id, results in eval.json and the card; a missed gate fails the build (exit 1)."""

import json

import pytest
from pydantic import ValidationError

from builder.check import tasks
from builder.canonical import sha256_file
from builder.release import identity
from builder.release.models import Eval
from builder.release.resolve import resolve

from conftest import Repo

TEXT = {"dataset": "data/eval.txt", "device": "cpu", "split": None, "samples": 2, "sequence_length": 32, "seed": 0,
        "gate": {"max_perplexity_increase_pct": None, "max_mean_kl": None}}
TASK = {"name": "world-capitals", "config": "data/tasks/world-capitals/task.yaml", "metric": "acc",
        "num_fewshot": 0, "limit": 8}
EVAL = ("eval.samples=2", "eval.sequence_length=32")


def eval_option(root, name: str, min_recovery) -> None:
    """specs/eval/<name>.yaml: the tiny eval text gate-free, plus world-capitals gated at min_recovery."""
    import yaml

    option = {**TEXT, "tasks": [{**TASK, "min_recovery": min_recovery}]}
    (root / "specs" / "eval" / f"{name}.yaml").write_text(yaml.safe_dump(option, sort_keys=False))


@pytest.fixture(scope="module")
def task_repo(tmp_path_factory) -> Repo:
    """A repository with a tiny Llama (byte tokenizer) and eval options whose task gate passes or cannot."""
    repo = Repo.fresh(tmp_path_factory.mktemp("tasks") / "repo")
    repo.add_model("tiny-llama", tokenizer=True)
    eval_option(repo.root, "capitals-open", None)
    eval_option(repo.root, "capitals-unreachable", 100)  # recovery 100: the artifact 100x the source's accuracy
    return repo


def test_recovery_is_artifact_over_source_inverted_when_lower_is_better_and_undefined_for_a_zero_source():
    assert tasks.recovery(0.8, 0.6, higher_is_better=True) == pytest.approx(0.75)
    assert tasks.recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(0.8)  # e.g. word perplexity
    assert tasks.recovery(0.0, 0.3, higher_is_better=True) is None


def test_a_task_gate_fails_when_the_source_scores_zero_and_when_recovery_is_below_its_minimum():
    found = {"acc,none": 0.0, "acc_stderr,none": "N/A", "higher_is_better": {"acc": True}, "samples": 4}
    rows = tasks.compare([{**TASK, "min_recovery": 0.5}], {"world-capitals": found},
                         {"world-capitals": {**found, "acc,none": 0.25}}, "specs/eval/x.yaml")
    assert rows[0]["recovery"] is None and rows[0]["passed"] is False
    problems = tasks.recovery_problems(rows, "specs/eval/x.yaml")
    assert [p.key for p in problems] == ["eval.tasks[0].min_recovery"] and "source scores 0" in problems[0].message
    halved = tasks.compare([{**TASK, "min_recovery": 0.9}], {"world-capitals": {**found, "acc,none": 0.5}},
                           {"world-capitals": {**found, "acc,none": 0.25}}, "specs/eval/x.yaml")
    assert halved[0]["recovery"] == 0.5 and "0.5 is below the gate's 0.9" in tasks.recovery_problems(halved, "x")[0].message
    unchecked = tasks.compare([{**TASK, "min_recovery": None}], {"world-capitals": found},
                              {"world-capitals": found}, "specs/eval/x.yaml")
    assert unchecked[0]["passed"] is True


def test_a_gate_on_a_metric_the_task_does_not_report_names_the_metrics_it_does():
    found = {"acc,none": 0.5, "acc_norm,none": 0.5, "higher_is_better": {"acc": True}, "samples": 4}
    with pytest.raises(Exception) as raised:
        tasks.compare([{**TASK, "metric": "f1", "min_recovery": 0.9}], {"world-capitals": found},
                      {"world-capitals": found}, "specs/eval/x.yaml")
    assert "'f1': task world-capitals reports acc, acc_norm" in str(raised.value)


def test_tasks_need_the_eval_text_and_a_task_forbids_unknown_keys():
    with pytest.raises(ValidationError, match="give a dataset"):
        Eval.of({"dataset": None, "device": "cpu", "tasks": [{**TASK, "min_recovery": 0.9}]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Eval.of({**TEXT, "tasks": [{**TASK, "min_recovery": 0.9, "shots": 5}]})
    assert Eval.of({**TEXT, "tasks": [{**TASK, "min_recovery": 0.9}]}).tasks[0].limit == 8


def test_a_local_task_pins_its_config_and_data_files_and_a_release_without_tasks_runs_no_task_part(task_repo):
    root = task_repo.root
    spec = resolve(root, "tiny-llama-fp8-dynamic", ("eval=capitals-open",))
    found = identity.inputs(root, spec)
    folder = "data/tasks/world-capitals"
    for name in ("task.yaml", "capitals.jsonl"):
        assert found["data"][f"{folder}/{name}"] == sha256_file(root / folder / name)
    assert found["versions"]["tasks"] == identity.OUTPUT_VERSIONS["tasks"] and "lm-eval" in found["toolchain"]
    plain = identity.inputs(root, resolve(root, "tiny-llama-fp8-dynamic", ("eval=docstrings",)))
    assert "tasks" not in plain["versions"] and "lm-eval" not in plain["toolchain"]
    assert set(plain["data"]) == {"data/eval.txt"}


def test_a_local_task_config_reads_its_data_from_its_own_folder_whatever_the_working_directory(task_repo):
    config = tasks.config_of(task_repo.root, {**TASK, "min_recovery": None}, "specs/eval/x.yaml")
    path = config["dataset_kwargs"]["data_files"]["test"]
    assert path == str(task_repo.root / "data/tasks/world-capitals/capitals.jsonl")
    assert config["task"] == "world-capitals" and config["output_type"] == "multiple_choice"
    with pytest.raises(Exception, match="defines task 'world-capitals'"):
        tasks.config_of(task_repo.root, {**TASK, "name": "other"}, "specs/eval/x.yaml")


def test_a_build_with_tasks_writes_scores_recovery_and_stack_to_eval_json_card_and_audit_importing_known_packages(task_repo, tmp_path):
    pytest.importorskip("lm_eval")
    from test_identity import assert_known_imports

    # built in a fresh process that also lists what it imported: lm-eval's packages are in the toolchain or inert
    assert_known_imports(task_repo, "tiny-llama-fp8-dynamic", ["eval=capitals-open", *EVAL], tmp_path)
    out = tmp_path / "a"
    result = json.loads((out / "eval.json").read_text())["tasks"]
    row, = result["results"]
    assert row["task"] == "world-capitals" and row["metric"] == "acc" and row["samples"] == 8
    assert 0 <= row["score"]["source"] <= 1 and 0 <= row["score"]["artifact"] <= 1
    assert row["passed"] is True and result["passed"] is True
    assert result["measured_with"]["harness"].startswith("lm-eval 0.4") and result["measured_with"]["dtype"] == "float32"
    assert result["measured_with"]["runtime"].startswith("transformers ") and result["measured_with"]["device"] == "cpu"
    card = (out / "README.md").read_text()
    assert "### Task accuracy" in card and "| world-capitals (0-shot) | acc | 8 |" in card
    audited = task_repo.run("audit", str(out), check=0).stdout
    assert "world-capitals" in audited and "measured with lm-eval 0.4" in audited


def test_a_build_whose_task_recovery_misses_its_gate_exits_1_and_leaves_nothing(task_repo, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "artifacts" / "gated"
    result = task_repo.run("build", "tiny-llama-fp8-dynamic", "eval=capitals-unreachable", *EVAL, "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert "eval.tasks[0].min_recovery: world-capitals acc recovery" in result.stderr
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [".gated.lock"]
