"""Crashes, concurrency and resource errors: nothing lost, nothing half-written."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from builder.build import build
from builder.check.verify import verify
from conftest import PROJECT

RELEASE = "tiny-llama-fp8-dynamic"
KILL_POINTS = ("read", "quantize", "shard", "manifest", "swap")


@pytest.fixture
def built(repo):
    """A repository whose release is already built once (the 'previous artifact')."""
    repo.add_model("tiny-llama")
    # a shard limit smaller than the model, so kills land between and inside several shards
    shard = repo.root / "specs" / "target" / "cpu.yaml"
    shard.write_text(shard.read_text().replace("max_shard_bytes: 5000000000", "max_shard_bytes: 65536"))
    repo.digest = build(repo.root, RELEASE, log=lambda message: None)["content_digest"]
    return repo


def artifacts_listing(repo):
    return sorted(p.name for p in (repo.root / "artifacts").iterdir())


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_build_leaves_the_previous_artifact_intact_and_the_next_build_succeeds(built, point):
    killed = built.run("build", RELEASE, "--force", env={"BUILDER_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # no partial artifact beside it: the previous one, and the buildinfo of who built that one
    assert artifacts_listing(built) == [RELEASE, f"{RELEASE}.buildinfo.json"]
    assert verify(built.root / "artifacts" / RELEASE)["content_digest"] == built.digest
    assert build(built.root, RELEASE, force=True, log=lambda message: None)["content_digest"] == built.digest
    assert [p.name for p in (built.root / ".builder").iterdir()] == [f"artifacts--{RELEASE}.lock"]


def test_a_gptq_build_killed_while_writing_leaves_no_scratch_after_the_next_build(calib_repo, tmp_path):
    """GPTQ's per-layer results sit in a scratch folder while the weights are written: a kill there
    leaves it, and the next build of the output removes it with the staging folder."""
    import shutil

    from conftest import Repo

    repo = Repo(tmp_path / "repo")
    shutil.copytree(calib_repo.root, repo.root, ignore=shutil.ignore_patterns("artifacts", ".builder"))
    small = ("calibration.samples=4", "calibration.sequence_length=32", "quant.weights.group_size=32")
    killed = repo.run("build", "tiny-llama-w4a16-gptq", *small, env={"BUILDER_FAILPOINT": "quantize"})
    assert killed.returncode == -signal.SIGKILL
    assert any("scratch" in p.name for p in (repo.root / ".builder").iterdir())
    repo.run("build", "tiny-llama-w4a16-gptq", *small, check=0)
    assert [p.suffix for p in (repo.root / ".builder").iterdir()] == [".lock"]


@pytest.mark.parametrize("point", ["quantize", "manifest"])
def test_a_build_killed_before_any_artifact_existed_leaves_nothing(repo, point):
    repo.add_model("tiny-llama")
    killed = repo.run("build", RELEASE, env={"BUILDER_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL
    assert not (repo.root / "artifacts").exists() or artifacts_listing(repo) == []


def start(repo, *args):
    env = {**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, "-m", "builder", *args], cwd=repo.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_simultaneous_builds_of_one_release_give_one_correct_artifact(repo):
    repo.add_model("tiny-llama")
    first, second = start(repo, "build", RELEASE, "--json"), start(repo, "build", RELEASE, "--json")
    results = [p.communicate() + (p.returncode,) for p in (first, second)]
    assert [code for _, _, code in results] == [0, 0], results
    digests = {json.loads(out)["content_digest"] for out, _, _ in results}
    assert len(digests) == 1
    assert artifacts_listing(repo) == [RELEASE, f"{RELEASE}.buildinfo.json"]
    assert verify(repo.root / "artifacts" / RELEASE)["content_digest"] in digests


def test_two_different_releases_build_concurrently_without_interference(repo):
    repo.add_model("tiny-llama")
    jobs = [start(repo, "build", "tiny-llama-fp8-dynamic", "--json"), start(repo, "build", "tiny-llama-bf16", "--json")]
    outputs = [json.loads(job.communicate()[0])["content_digest"] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0]
    for name, output in zip(("tiny-llama-fp8-dynamic", "tiny-llama-bf16"), outputs):
        assert verify(repo.root / "artifacts" / name)["content_digest"] == output
        serial = build(repo.root, name, out=repo.root.parent / f"serial-{name}", log=lambda message: None)
        assert serial["content_digest"] == output


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_behind(repo):
    repo.add_model("tiny-llama")
    limit = 64 * 1024  # bytes: below the tiny model's weights, above the lock and spec files

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "builder", "build", RELEASE], cwd=repo.root,
                            env={**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT)},
                            preexec_fn=small_disk, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "I/O error" in result.stderr and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (repo.root / "artifacts").exists() or artifacts_listing(repo) == []
    assert [p.name for p in (repo.root / ".builder").iterdir()] == [f"artifacts--{RELEASE}.lock"]


def test_an_unreadable_weights_file_is_a_clear_error(repo):
    weights = repo.add_model("tiny-llama")
    (weights / "model.safetensors").rename(weights / "moved")
    (weights / "model.safetensors").mkdir()  # a folder where a file must be: reading it fails
    result = repo.run("build", RELEASE)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (repo.root / "artifacts").exists()


def test_no_output_file_mentions_home_host_user_or_the_repository_path(repo, tmp_path):
    repo.add_model("tiny-llama")
    home = tmp_path / "home-of-a-secret-user"
    home.mkdir()
    repo.run("lock", check=0)
    repo.run("build", RELEASE, env={"HOME": str(home), "USER": "secret-user", "LOGNAME": "secret-user"}, check=0)
    needles = [str(home), "secret-user", str(repo.root), str(tmp_path), os.path.expanduser("~")]
    hostname = socket.gethostname()
    if len(hostname) >= 6:  # a short host name could match by chance inside binary data
        needles.append(hostname)
    written = [*(repo.root / "artifacts").rglob("*"), *(repo.root / "locks").rglob("*"), repo.root / "params.yaml"]
    for path in (p for p in written if p.is_file()):
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{path.name} contains {needle!r}"
