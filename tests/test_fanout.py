"""Fan-out: several releases built in parallel jobs (submitit), bit for bit as serial builds."""

import os

import pytest

from builder import build
from builder.pipeline import fanout
from builder.errors import BuilderError

RELEASES = ["tiny-llama-bf16", "tiny-llama-fp8-dynamic"]


def test_releases_built_in_separate_local_jobs_match_serial_builds(repo, tmp_path, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # as a terminal session has it
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
    logs = sorted((tmp_path / "jobs").rglob("*_log.err"))
    assert len(logs) == 2 and not [log for log in logs if "it/s]" in log.read_text()]  # no library bars in job logs
    assert "TQDM_DISABLE" not in os.environ  # set for the jobs only


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


# --- What each job asks for (no cluster needed) ----------------------------------------------------

GIB = 1 << 30
NODES = [{"name": "big-cpu", "cpus": 64, "mem_bytes": 32 * GIB}, {"name": "big-mem", "cpus": 8, "mem_bytes": 512 * GIB}]


def shipped_spec(release: str) -> dict:
    from builder.release.resolve import resolve
    from conftest import PROJECT

    return resolve(PROJECT, release)


def test_a_jobs_memory_is_the_releases_build_estimate_with_a_margin_in_quarter_gib():
    spec = shipped_spec("smollm2-135m-instruct-fp8-dynamic")
    figures = fanout.build_memory(spec)
    # SmolLM2-135M: 134,515,008 BF16 parameters read and written (538 MB) is less than the 512 MiB in
    # flight + 256 MiB of spares; + 768 MiB base = 1.34 GB; x 1.5 = 2.02 GB
    assert figures["phases"] == {"stream": 134_515_008 * 2 * 2}
    assert figures["peak"] == fanout.BASE_BYTES + figures["phases"]["stream"] == 1_343_366_400
    assert figures["request"] == 8 * (256 << 20)  # 2 GiB: the first quarter GiB above 1.5 x the peak
    assert figures["request"] - (256 << 20) < figures["peak"] * fanout.MARGIN <= figures["request"]
    assert fanout.job_request(spec, {}, node_cpus=64) == {"cpus_per_task": 2, "mem_gb": 2.0}


def test_calibration_gptq_and_evaluation_raise_a_releases_memory_estimate():
    streamed = fanout.build_memory(shipped_spec("smollm2-135m-instruct-fp8-dynamic"))
    static = fanout.build_memory(shipped_spec("smollm2-135m-instruct-fp8-static"))
    gptq = fanout.build_memory(shipped_spec("smollm2-135m-instruct-w4a16-gptq"))
    assert set(static["phases"]) == set(gptq["phases"]) == {"stream", "calibration", "eval"}
    assert gptq["phases"]["calibration"] > static["phases"]["calibration"]  # the layer's Hessians
    # evaluation holds source and artifact whole in FP32: the largest phase of a small model
    assert static["peak"] > streamed["peak"] and static["peak"] - fanout.BASE_BYTES == static["phases"]["eval"]


def test_a_larger_model_asks_for_more_memory():
    spec = shipped_spec("smollm2-135m-instruct-w4a16-gptq")
    wide = {**spec, "model": {**spec["model"], "architecture": {**spec["model"]["architecture"],
                                                                "hidden_size": 4096, "intermediate_size": 14336}}}
    small, large = fanout.build_memory(spec), fanout.build_memory(wide)
    assert all(large["phases"][phase] > small["phases"][phase] for phase in small["phases"])
    # GPTQ on a 14336-wide down_proj: its FP32 Hessian alone is 822 MB, and the factorisation twice that
    assert large["phases"]["calibration"] > 3 * 14336 ** 2 * 4
    # a tensor larger than the bytes in flight goes through alone: a 128256 x 4096 embedding, 1 GB in BF16
    wide["model"]["architecture"]["vocab_size"] = 128256
    assert fanout.build_memory(wide)["phases"]["stream"] == 2 * 2 * 128256 * 4096 + fanout.SPARE_BYTES


def test_a_jobs_cpus_are_the_builds_threads_but_never_more_than_the_largest_node_has():
    spec = shipped_spec("smollm2-135m-instruct-bf16")
    assert fanout.job_request(spec, {}, node_cpus=64)["cpus_per_task"] == build.determinism.TORCH_THREADS == 2
    assert fanout.job_request(spec, {}, node_cpus=1)["cpus_per_task"] == 1


def test_slurm_options_override_a_jobs_cpus_and_memory():
    spec = shipped_spec("smollm2-135m-instruct-bf16")
    assert fanout.job_request(spec, {"cpus_per_task": 8, "mem": "64G"}, 64) == {"cpus_per_task": 8, "mem_gb": 64.0}
    assert fanout.job_request(spec, {"mem_gb": 3}, 64)["mem_gb"] == 3.0
    assert fanout.job_request(spec, {"mem": 4096}, 64)["mem_gb"] == 4.0  # sbatch's default unit: MB
    assert fanout.job_request(spec, {"mem": "1T"}, 64)["mem_gb"] == 1024.0
    with pytest.raises(BuilderError, match="--slurm: mem: 'lots': expected a size such as 16G"):
        fanout.job_request(spec, {"mem": "lots"}, 64)
    with pytest.raises(BuilderError, match="--slurm: cpus_per_task: 'two': expected a whole number of CPUs"):
        fanout.job_request(spec, {"cpus_per_task": "two"}, 64)


def test_a_request_no_single_node_holds_is_refused_naming_the_release_and_the_nodes():
    fits = {"a": {"cpus_per_task": 64, "mem_gb": 32.0}, "b": {"cpus_per_task": 8, "mem_gb": 512.0}}
    assert fanout.request_problems(fits, NODES) == []
    too_much = {"cpus": {"cpus_per_task": 65, "mem_gb": 1.0}, "mem": {"cpus_per_task": 1, "mem_gb": 513.0},
                "both": {"cpus_per_task": 64, "mem_gb": 33.0}}  # each alone fits a node, together none
    problems = [str(p) for p in fanout.request_problems(too_much, NODES)]
    assert len(problems) == 3
    assert problems[0] == ("specs/release/cpus.yaml: a job of 65 CPUs and 1.00 GiB fits no node (big-cpu 64 CPUs "
                           "32.00 GiB, big-mem 8 CPUs 512.00 GiB); lower --slurm cpus_per_task or mem_gb, or choose "
                           "a partition with larger nodes")
    assert problems[1].startswith("specs/release/mem.yaml: a job of 1 CPUs and 513.00 GiB fits no node")
    assert problems[2].startswith("specs/release/both.yaml: a job of 64 CPUs and 33.00 GiB fits no node")


def test_build_many_takes_releases_or_stale_not_both_nor_neither(capsys):
    from builder import cli

    for args in ((), ("tiny-llama-bf16", "--stale")):
        assert cli.main(["build-many", *args]) == 2
        assert "name the releases to build, or pass --stale" in capsys.readouterr().err


def test_stale_releases_are_the_build_stages_dvc_would_run_once_imports_are_done(tmp_path):
    from conftest import Pipeline

    pipeline = Pipeline(tmp_path)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  import:\n    foreach: [m]\n    do:\n      cmd: mkdir -p weights/${item} && echo w > weights/${item}/w\n"
        "      outs:\n        - weights/${item}\n"
        "  build:\n    foreach: [b, a]\n    do:\n      cmd: mkdir -p artifacts/${item} && cp weights/m/w artifacts/${item}/\n"
        "      deps:\n        - weights/m\n      outs:\n        - artifacts/${item}\n")
    pipeline.git("init", "-q")
    pipeline.dvc("init", "-q")
    with pytest.raises(BuilderError, match=r"dvc.yaml: import@m: stale; import first \(`dvc repro import@m`\)"):
        fanout.stale_releases(tmp_path)
    pipeline.dvc("repro", "import@m")
    assert fanout.stale_releases(tmp_path) == ["a", "b"]
    pipeline.dvc("repro", "build@a")
    assert fanout.stale_releases(tmp_path) == ["b"]
