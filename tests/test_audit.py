"""audit: what an artifact was built from, and every way it can stop holding (tampering, inputs, locks)."""

import hashlib
import json
import shutil
import subprocess

import pytest

from builder.check import audit, signing
from builder import build
from builder.release import lock
from builder.artifact import record
from builder.check.verify import verify
from conftest import Repo, flip_last_byte
from test_provenance import forge_weight_and_manifest
from test_signing import write_keys

RELEASE = "tiny-llama-fp8-dynamic"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository with committed locks and one built, signed artifact (shared read-only)."""
    from conftest import PROJECT

    root = tmp_path_factory.mktemp("audit") / "repo"
    shutil.copytree(PROJECT / "specs", root / "specs")
    shutil.copytree(PROJECT / "data", root / "data")  # the shipped releases' calibration/eval text
    repository = Repo(root)
    repository.add_model("tiny-llama")
    lock.write(root)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "locks"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "locks"], cwd=root, check=True)
    build.build(root, RELEASE, log=lambda m: None)
    repository.keys = write_keys(tmp_path_factory.mktemp("keys"))
    signing.sign(root / "artifacts" / RELEASE, repository.keys[0])
    return repository


@pytest.fixture
def copy(repo, tmp_path):
    """A copy of the signed artifact, with its signature beside it."""
    source = repo.root / "artifacts" / RELEASE
    shutil.copytree(source, tmp_path / RELEASE)
    shutil.copy(signing.signature_path(source), tmp_path / f"{RELEASE}.sig")
    return tmp_path / RELEASE


def test_audit_of_an_intact_signed_artifact_holds_and_names_every_input(repo, copy):
    report = audit.audit(copy, repo.root, public_key=repo.keys[1])
    assert report["holds"], audit.render(report)
    assert report["release"] == RELEASE and report["artifact_id"] == record.read(copy).manifest["artifact_id"]
    assert [row["name"] for row in report["inputs"]] == ["weights", "tokenizer/tokenizer.json",
                                                         "tokenizer/tokenizer_config.json", "builder", "toolchain"]
    assert all(row["status"] == "ok" for row in report["inputs"] + report["toolchain"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo.root, capture_output=True, text=True).stdout
    assert report["lock"]["status"] == "ok" and report["lock"]["commit"] == head.strip()
    assert report["signature"]["status"] == "ok"
    text = audit.render(report)
    assert "RESULT: holds" in text and f"last changed in commit {head.strip()}" in text


def edit_config(out):
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))


TAMPERINGS = {  # name -> (how, the file each check must name)
    "flipped weight byte": (lambda out: flip_last_byte(out / "model.safetensors"), "model.safetensors"),
    "edited config.json": (edit_config, "config.json"),
    "added file": (lambda out: (out / "notes.txt").write_text("hello"), "notes.txt"),
    "removed file": (lambda out: (out / "release.json").unlink(), "release.json"),
    "renamed file": (lambda out: (out / "config.json").rename(out / "config.orig.json"), "config.orig.json"),
    "forged manifest": (forge_weight_and_manifest, "model.safetensors"),
    "corrupt manifest": (lambda out: (out / "manifest.json").write_text("{"), "manifest.json"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_every_tampering_is_caught_by_verify_audit_and_the_signature_naming_the_file(repo, copy, tampering):
    from builder.errors import CheckFailed

    how, named = TAMPERINGS[tampering]
    how(copy)
    with pytest.raises(CheckFailed) as caught:
        verify(copy)
    assert f"{RELEASE}/{named}" in caught.value.render()
    report = audit.audit(copy, repo.root, public_key=repo.keys[1])
    assert not report["holds"]
    assert report["verification"]["status"] == "FAILED" and named in str(report["verification"]["detail"])
    assert report["signature"]["status"] == "FAILED" and named in str(report["signature"]["detail"])
    assert "RESULT: DOES NOT HOLD" in audit.render(report)


def test_audit_reports_a_local_input_that_no_longer_matches(repo, copy, tmp_path):
    local = tmp_path / "repo"
    shutil.copytree(repo.root, local, ignore=shutil.ignore_patterns("artifacts"))
    (local / "weights" / "tiny-llama" / "config.json").write_text("{}")
    report = audit.audit(copy, local, public_key=repo.keys[1])
    weights = report["inputs"][0]
    assert weights["name"] == "weights" and weights["status"] == "FAILED" and "differs" in weights["local"]
    assert not report["holds"] and report["verification"]["status"] == "ok"


def test_audit_fails_when_the_lock_names_another_artifact_id(repo, copy, tmp_path):
    local = tmp_path / "repo"
    shutil.copytree(repo.root, local, ignore=shutil.ignore_patterns("artifacts"))
    path = local / "locks" / f"{RELEASE}.json"
    entry = json.loads(path.read_text())
    entry["artifact_id"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(entry))
    report = audit.audit(copy, local)
    assert report["lock"]["status"] == "FAILED" and "sha256:" + "0" * 64 in report["lock"]["detail"]
    assert "working copy differs" in report["lock"]["git"] and report["lock"]["commit"]
    assert report["signature"]["status"] == "not checked" and not report["holds"]


def test_audit_outside_a_repository_checks_what_it_can_and_says_what_it_cannot(copy):
    report = audit.audit(copy, None)
    assert report["holds"] and report["lock"]["status"] == "not checked"
    rows = {row["name"]: row for row in report["inputs"]}
    assert rows["weights"]["status"] == "not checked" and "no release repository" in rows["weights"]["local"]
    assert rows["builder"]["status"] == "ok"


def test_audit_cli_prints_json_and_exits_1_when_something_does_not_hold(repo, copy):
    result = repo.run("audit", str(copy), "--json", "--key", str(repo.keys[1]), check=0)
    assert json.loads(result.stdout)["holds"] is True
    (copy / "notes.txt").write_text("hello")
    result = repo.run("audit", str(copy), check=1)
    assert "notes.txt" in result.stdout and "RESULT: DOES NOT HOLD" in result.stdout


def test_data_files_are_provenance_inputs_and_audit_notices_when_they_change(repo, tmp_path):
    from conftest import PROJECT

    root = tmp_path / "repo"
    shutil.copytree(PROJECT / "specs", root / "specs")
    shutil.copytree(repo.root / "weights", root / "weights")
    shutil.copy(repo.root / "specs" / "model" / "tiny-llama.yaml", root / "specs" / "model")
    shutil.copy(repo.root / "specs" / "release" / "tiny-llama-bf16.yaml", root / "specs" / "release")
    (root / "data").mkdir()
    (root / "data" / "eval.txt").write_text("The quick brown fox.\n")
    out = root / "artifacts" / "a"
    data = ("calibration.dataset=data/eval.txt", "+calibration.split=null", "+calibration.samples=1",
            "+calibration.sequence_length=8", "+calibration.seed=0")
    build.build(root, "tiny-llama-bf16", data, out=out, log=lambda m: None)
    dependencies = record.read(out).provenance["predicate"]["buildDefinition"]["resolvedDependencies"]
    digest = hashlib.sha256(b"The quick brown fox.\n").hexdigest()
    assert {"name": "calibration", "uri": "data/eval.txt", "digest": {"sha256": digest},
            "annotations": {"digestOf": "file"}} in dependencies
    report = audit.audit(out, root)
    assert report["holds"] and "overrides" in report["lock"]["detail"]
    (root / "data" / "eval.txt").write_text("Another text.\n")
    report = audit.audit(out, root)
    rows = {row["name"]: row for row in report["inputs"]}
    assert rows["calibration"]["status"] == "FAILED" and not report["holds"]
    assert report["lock"]["status"] == "FAILED"  # today's data give another artifact_id
