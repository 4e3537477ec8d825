"""provenance.json: a valid in-toto Statement v1 / SLSA provenance v1, deterministic, naming every file."""

import subprocess

import pytest

from builder import build
from builder.artifact import provenance, record
from builder.canonical import file_entries
from builder.paths import MANIFEST_FILE, RECORD_FILES
from builder.release import lock
from conftest import flip_last_byte


def built(repo, release, out, **kwargs):
    return build.build(repo.root, release, out=out, log=lambda m: None, **kwargs)


@pytest.mark.parametrize("recipe", ["bf16", "fp8-dynamic"])
def test_provenance_validates_against_the_schemas_and_its_subjects_are_the_files(tiny_repo, recipe, tmp_path):
    out = tmp_path / "a"
    result = built(tiny_repo, f"tiny-qwen2-{recipe}", out)
    document = record.read(out).provenance
    assert provenance.schema_problems(document, "provenance.json") == []
    assert document["_type"] == "https://in-toto.io/Statement/v1"
    assert document["predicateType"] == "https://slsa.dev/provenance/v1"
    others = file_entries(out, exclude=frozenset({"manifest.json", "provenance.json"}))
    assert [s["name"] for s in document["subject"]] == [e["path"] for e in others]
    assert provenance.subject_problems(document, others, "a") == []
    assert [e["path"] for e in result["files"]] == [e["path"] for e in others]  # what the content digest covers
    assert [e["path"] for e in result["records"]] == ["provenance.json"]  # checked by verify, outside the digest
    build_definition = document["predicate"]["buildDefinition"]
    assert build_definition["internalParameters"]["artifact_id"] == result["artifact_id"]
    assert build_definition["externalParameters"]["release"] == f"tiny-qwen2-{recipe}"
    names = [d["name"] for d in build_definition["resolvedDependencies"]]
    assert names[0] == "weights" and {"builder", "toolchain"} <= set(names)


def test_provenance_is_byte_identical_and_free_of_paths_and_clock(tiny_repo, tmp_path, monkeypatch):
    built(tiny_repo, "tiny-llama-bf16", tmp_path / "one")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("TZ", "Asia/Kathmandu")
    built(tiny_repo, "tiny-llama-bf16", tmp_path / "two")
    text = (tmp_path / "one" / "provenance.json").read_text()
    assert text == (tmp_path / "two" / "provenance.json").read_text()
    for leaked in (str(tmp_path), str(tiny_repo.root), "1700000000", "startedOn"):
        assert leaked not in text


def test_provenance_names_the_lock_by_its_git_blob(repo, tmp_path):
    repo.add_model("tiny-llama")
    lock.write(repo.root)
    subprocess.run(["git", "init", "-q", str(repo.root)], check=True)
    expected = subprocess.run(["git", "hash-object", "locks/tiny-llama-bf16.json"], cwd=repo.root,
                              capture_output=True, text=True, check=True).stdout.strip()
    built(repo, "tiny-llama-bf16", tmp_path / "a")
    parameters = record.read(tmp_path / "a").provenance["predicate"]["buildDefinition"]["externalParameters"]
    assert parameters["lock"] == {"uri": "locks/tiny-llama-bf16.json",
                                  "digest": {"gitBlob": expected, "sha256": parameters["lock"]["digest"]["sha256"]}}


def test_the_schemas_reject_a_statement_without_subjects_or_builder(tiny_repo, tmp_path):
    built(tiny_repo, "tiny-llama-bf16", tmp_path / "a")
    document = record.read(tmp_path / "a").provenance
    document["subject"] = []
    del document["predicate"]["runDetails"]["builder"]["id"]
    problems = [str(p) for p in provenance.schema_problems(document, "provenance.json")]
    assert any("provenance.json: subject:" in p for p in problems), problems
    assert any("predicate.runDetails.builder" in p and "'id'" in p for p in problems), problems


def test_verify_catches_a_manifest_rewritten_to_match_a_tampered_weight(tiny_repo, tmp_path):
    from builder.errors import CheckFailed
    from builder.check.verify import verify

    out = tmp_path / "a"
    built(tiny_repo, "tiny-llama-fp8-dynamic", out)
    forge_weight_and_manifest(out)
    with pytest.raises(CheckFailed, match="a/model.safetensors: sha256 .* differs from provenance.json"):
        verify(out)


def forge_weight_and_manifest(out):
    """Flip a weight byte, then rewrite manifest.json's file list and content digest to match."""
    from builder.canonical import pretty_json, tree_digest

    flip_last_byte(out / "model.safetensors")
    recorded = record.read(out).manifest
    recorded["files"] = file_entries(out, exclude=RECORD_FILES)
    recorded["content_digest"] = tree_digest(recorded["files"])
    (out / MANIFEST_FILE).write_text(pretty_json(recorded))



def test_provenance_names_no_builder_revision_or_host_and_buildinfo_beside_the_folder_does(tiny_repo, tmp_path):
    from builder.artifact import buildinfo
    from builder.release import identity

    out = tmp_path / "a"
    built(tiny_repo, "tiny-llama-fp8-dynamic", out)
    text = (out / "provenance.json").read_text()
    source = provenance.hex_digest(identity.builder_digest())
    assert source not in text and "@" not in record.read(out).provenance["predicate"]["runDetails"]["builder"]["id"]
    beside = buildinfo.read(out)
    assert buildinfo.path(out) == tmp_path / "a.buildinfo.json" and beside is not None
    assert provenance.schema_problems(beside, "a.buildinfo.json") == []
    assert [s["name"] for s in beside["subject"]] == [e["path"] for e in file_entries(out)]  # records too
    assert beside["predicate"]["buildDefinition"] == record.read(out).provenance["predicate"]["buildDefinition"]
    who = buildinfo.summary(beside)
    assert who["source"] == source and who["host"]["hostname"] and who["started"] <= who["finished"]
