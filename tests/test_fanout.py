"""Fan-out: several releases built in parallel jobs (submitit), bit for bit as serial builds."""

import os

import pytest

from builder import build
from builder.pipeline import fanout
from builder.errors import BuilderError

RELEASES = ["tiny-llama-bf16", "tiny-llama-fp8-dynamic"]


def test_releases_built_in_separate_local_jobs_match_serial_builds(repo, tmp_path):
    repo.add_model("tiny-llama")
    results = fanout.build_many(repo.root, RELEASES, build.job, "local", folder=tmp_path / "jobs", log=lambda m: None)
    assert [r["release"] for r in results] == RELEASES
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # each release in a process of its own
    for result in results:
        serial = build.build(repo.root, result["release"], out=tmp_path / result["release"], log=lambda m: None)
        assert result["content_digest"] == serial["content_digest"]
        assert (repo.root / "artifacts" / result["release"] / "manifest.json").read_bytes() == \
            (tmp_path / result["release"] / "manifest.json").read_bytes()


def test_build_many_refuses_unknown_releases_and_launchers_before_submitting(repo, tmp_path):
    with pytest.raises(BuilderError) as refused:
        fanout.build_many(repo.root, ["no-such-release"], build.job, "kubernetes", folder=tmp_path / "jobs")
    message = refused.value.render()
    assert "specs/release/no-such-release.yaml: no such release" in message
    assert "'kubernetes'; allowed: local, slurm" in message
    assert not (tmp_path / "jobs").exists()


def test_a_failing_job_is_reported_with_its_release_and_log(repo, tmp_path):
    weights = repo.add_model("tiny-llama")
    (weights / "config.json").write_text((weights / "config.json").read_text() + " ")  # digest no longer pinned
    with pytest.raises(BuilderError, match="tiny-llama-bf16.yaml: job .*: .*model.digest.* is not the digest of .*refusing"):
        fanout.build_many(repo.root, ["tiny-llama-bf16"], build.job, folder=tmp_path / "jobs", log=lambda m: None)
