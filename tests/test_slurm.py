"""build-many on a real one-node SLURM cluster with accounting (`bash .ci/slurm.sh start`): bit for bit
as serial builds; a cancelled job and an impossible request end with exit 1 and 2, not a hang; --stale
records what the cluster built in dvc.lock as `dvc repro` does.

    bash .ci/slurm.sh start && python -m pytest -m slurm tests/test_slurm.py
Skipped where no cluster runs; in CI (CI=true), where .ci/run starts one, a missing cluster fails.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from builder import build
from builder.canonical import file_entries
from builder.pipeline import fanout
from conftest import PROJECT

pytestmark = pytest.mark.slurm
RELEASES = ["tiny-llama-bf16", "tiny-llama-fp8-dynamic"]
ONE_CPU = ("--slurm", "cpus_per_task=1")  # both jobs at once on a 2-CPU node (each build pins its threads)
CANCEL_SECONDS = 120  # submitit sees a cancelled job through sacct within ~15 s of its end


def cluster_problem() -> str:
    """Why no SLURM cluster takes jobs here, or "" when one does (a node up, accounting answering)."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as error:
        return f"{error.cmd[0]} does not answer"
    if not re.search(r"^(idle|mix|alloc)", nodes.stdout, re.MULTILINE):
        return f"no node takes jobs (sinfo: {(nodes.stdout + nodes.stderr).strip()[:200]})"
    if accounting.returncode:
        return f"sacct does not answer ({accounting.stderr.strip()[:200]})"
    return ""


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, as {"cpus": the largest node's CPUs}; a skip with the reason when there is
    none, a failure in CI."""
    problem = cluster_problem()
    if problem:
        message = f"no SLURM cluster here: {problem}; start one with `bash .ci/slurm.sh start`"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI runs .ci/run, which starts it)")
        pytest.skip(message)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True).stdout.split()
    return {"cpus": max(int(cpus) for cpus in nodes)}


def sacct_state(job_id: str, final: str = "COMPLETED", seconds: float = 30) -> str:
    """The job's state in accounting, waiting up to seconds for `final` (slurmctld reports to slurmdbd
    a moment after the job ends)."""
    deadline = time.monotonic() + seconds
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
        if out.stdout.strip() == final or time.monotonic() > deadline:
            return out.stdout.strip()
        time.sleep(1)


def slurm_conf() -> str:
    """The running cluster's slurm.conf (scontrol's SLURM_CONF)."""
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return re.search(r"^SLURM_CONF\s*=\s*(\S+)", shown, re.MULTILINE).group(1)


def job_ids(stderr: str) -> dict:
    """{release: job id} from build-many's "submitted ...: RELEASE ID, RELEASE ID" lines."""
    pairs = [pair.split() for line in stderr.splitlines() if line.startswith("submitted ")
             for pair in line.split(": ", 1)[1].split(", ")]
    return {release: job for release, job in pairs}


def test_releases_built_as_slurm_jobs_match_serial_builds_bit_for_bit(repo, cluster, tmp_path):
    repo.add_model("tiny-llama")
    result = repo.run("build-many", *RELEASES, "--launcher", "slurm", *ONE_CPU, check=0)
    ids = job_ids(result.stderr)
    assert sorted(ids) == sorted(RELEASES), result.stderr
    assert all(sacct_state(job) == "COMPLETED" for job in ids.values())  # they ran as SLURM jobs
    for release in RELEASES:
        serial = build.build(repo.root, release, out=tmp_path / release, log=lambda m: None)
        assert f"{release} {serial['content_digest']}" in result.stdout.splitlines()
        built = repo.root / "artifacts" / release
        assert file_entries(built) == file_entries(tmp_path / release)  # every file, records included


def test_a_cancelled_job_ends_the_command_with_exit_1_naming_release_and_job(repo, cluster):
    repo.add_model("tiny-llama")
    environment = {**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT)}  # as Repo.run
    began = time.monotonic()
    command = subprocess.Popen([sys.executable, "-m", "builder", "build-many", "tiny-llama-bf16", "--launcher",
                                "slurm", *ONE_CPU], cwd=repo.root, env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""
    for line in command.stderr:  # scancel as soon as the job exists: it is pending or starting
        seen += line
        if "submitted" in line:
            break
    job = job_ids(seen).get("tiny-llama-bf16")
    assert job, seen
    subprocess.run(["scancel", job], check=True)
    try:
        stdout, stderr = command.communicate(timeout=CANCEL_SECONDS)
    except subprocess.TimeoutExpired:
        command.kill()
        pytest.fail(f"build-many still waits {CANCEL_SECONDS} s after its job {job} was cancelled")
    assert command.returncode == 1, stderr
    assert re.search(rf"tiny-llama-bf16\.yaml: job {job} ended without a result \(state CANCELLED", stderr), stderr
    assert not (repo.root / "artifacts" / "tiny-llama-bf16").exists()
    print(f"cancelled job reported after {time.monotonic() - began:.1f} s")


def test_a_request_no_node_can_hold_is_refused_with_exit_2_before_submitting(repo, cluster):
    repo.add_model("tiny-llama")
    cpus = repo.run("build-many", "tiny-llama-bf16", "--launcher", "slurm", "--slurm",
                    f"cpus_per_task={cluster['cpus'] + 1}", check=2)
    assert f"tiny-llama-bf16.yaml: a job of {cluster['cpus'] + 1} CPUs" in cpus.stderr and "fits no node" in cpus.stderr
    memory = repo.run("build-many", "tiny-llama-bf16", "--launcher", "slurm", "--slurm", "mem=100T", check=2)
    assert "102400.00 GiB fits no node" in memory.stderr
    assert not (repo.root / ".fanout").exists()  # submitit makes its folder when it submits


def test_a_cluster_whose_accounting_does_not_answer_is_refused_before_submitting(repo, cluster, tmp_path):
    # the same cluster, its accounting daemon looked for on a port where none listens
    text = re.sub(r"^AccountingStoragePort=.*\n", "", open(slurm_conf()).read(), flags=re.MULTILINE)
    (tmp_path / "slurm.conf").write_text(text + "AccountingStoragePort=9\n")
    repo.add_model("tiny-llama")
    refused = repo.run("build-many", "tiny-llama-bf16", "--launcher", "slurm",
                       env={"SLURM_CONF": str(tmp_path / "slurm.conf")}, check=2)
    assert "slurm: accounting does not answer" in refused.stderr and "waited for forever" in refused.stderr
    assert not (repo.root / ".fanout").exists()


def test_a_job_counts_as_gone_only_when_the_controller_says_it_knows_no_such_job(cluster, tmp_path, monkeypatch):
    # a wait ends without a result only for a job the scheduler no longer knows: an id it never had is
    # not listed; the same question to a controller that does not answer (a port where none listens,
    # as during a restart) is no evidence, and a wait through a restart goes on
    assert not fanout.queued("999999")
    (tmp_path / "slurm.conf").write_text(re.sub(r"^SlurmctldPort=.*\n", "", open(slurm_conf()).read(),
                                                flags=re.MULTILINE) + "SlurmctldPort=9\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    assert fanout.queued("999999")


def test_stale_releases_built_on_the_cluster_are_recorded_in_dvc_lock_as_dvc_repro_does(pipeline, cluster):
    repro_lock = (pipeline.root / "dvc.lock").read_text()  # what `dvc repro` wrote
    entries = yaml.safe_load(repro_lock)
    del entries["stages"]["build@tiny-llama-bf16"]  # never built here
    (pipeline.root / "dvc.lock").write_text(yaml.safe_dump(entries, sort_keys=False))
    shutil.rmtree(pipeline.root / "artifacts" / "tiny-llama-bf16")
    shutil.rmtree(pipeline.root / "artifacts" / "tiny-qwen2-fp8-dynamic")  # built, then lost
    result = pipeline.sh(sys.executable, "-m", "builder", "build-many", "--stale", "--launcher", "slurm", *ONE_CPU)
    assert "stale: tiny-llama-bf16, tiny-qwen2-fp8-dynamic" in result.stderr
    assert sorted(job_ids(result.stderr)) == ["tiny-llama-bf16", "tiny-qwen2-fp8-dynamic"]
    recorded = (pipeline.root / "dvc.lock").read_text()
    # dvc repro's entries exactly (a stage recorded anew goes last, as dvc repro puts it), and dvc repro
    # itself then finds nothing to run and leaves the file as it is
    assert yaml.safe_load(recorded) == yaml.safe_load(repro_lock)
    assert "up to date" in pipeline.dvc("status").stdout
    assert pipeline.repro() == set() and (pipeline.root / "dvc.lock").read_text() == recorded
    again = pipeline.sh(sys.executable, "-m", "builder", "build-many", "--stale", "--launcher", "slurm")
    assert "nothing is stale" in again.stderr and not again.stdout


def test_a_job_cancelled_while_it_waits_in_its_array_ends_the_command_with_exit_1(repo, cluster):
    # two 2-CPU jobs in one array on the 2-CPU node: the second waits inside the array's pending record,
    # and cancelling it there leaves no queue entry and no accounting row (a wait without end before)
    repo.add_model("tiny-llama")
    environment = {**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT)}  # as Repo.run
    command = subprocess.Popen([sys.executable, "-m", "builder", "build-many", "tiny-llama-bf16", "tiny-llama-fp8-dynamic",
                                "--launcher", "slurm", "--slurm", "cpus_per_task=2", "--slurm", "mem_gb=2"],
                               cwd=repo.root, env=environment, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""
    for line in command.stderr:
        seen += line
        if "submitted" in line:
            break
    jobs = job_ids(seen)
    assert set(jobs) == {"tiny-llama-bf16", "tiny-llama-fp8-dynamic"}, seen
    subprocess.run(["scancel", jobs["tiny-llama-fp8-dynamic"]], check=True)
    try:
        stdout, stderr = command.communicate(timeout=CANCEL_SECONDS + fanout.VANISHED_SECONDS)
    except subprocess.TimeoutExpired:
        command.kill()
        pytest.fail(f"build-many still waits after its pending job {jobs['tiny-llama-fp8-dynamic']} was cancelled")
    assert command.returncode == 1, stderr
    assert re.search(rf"tiny-llama-fp8-dynamic\.yaml: job {re.escape(jobs['tiny-llama-fp8-dynamic'])} ended without "
                     r"a result \(state (CANCELLED|UNKNOWN)", stderr), stderr
    assert "tiny-llama-bf16: built" in stderr and (repo.root / "artifacts" / "tiny-llama-bf16").is_dir()
    assert not (repo.root / "artifacts" / "tiny-llama-fp8-dynamic").exists()
