"""Build several releases in parallel through submitit: local processes here, SLURM jobs on a cluster.

    builder build-many REL... [--launcher local|slurm] [--slurm partition=cpu --slurm array_parallelism=8]
    builder build-many --stale --launcher slurm     # what `dvc repro` would build, recorded in dvc.lock
Each job asks for the CPUs a build uses and the memory its release is estimated to need (job_request);
a request no node can hold, or a cluster whose accounting does not answer, is refused before anything
is submitted. docs/clusters.md says how to run it.
"""

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from builder.artifact.stream import IN_FLIGHT_BYTES, SPARE_BYTES
from builder.console import BARS_OFF
from builder.determinism import TORCH_THREADS
from builder.errors import BuilderError, CheckFailed, Problem
from builder.release import cache, memory
from builder.release.recipe import Recipe
from builder.release.resolve import list_releases, resolve, unknown_release

LAUNCHERS = ("local", "slurm")  # submitit executor names
JOB = {"timeout_min": 240}  # per release; CPUs and memory come from job_request
JOBS_DIR = ".fanout"  # submitit's pickles and logs, one folder per job (on a shared disk for SLURM)
FP32 = 4  # bytes: calibration, GPTQ and evaluation compute in FP32
SOURCE_BYTES = 2  # bytes per source parameter: checkpoints are BF16 or F16 (an F32 one streams twice the bytes)
# RSS of a build process before any tensor: interpreter, torch, transformers, tokenizers (~0.5 GB measured).
BASE_BYTES = 768 << 20
# Headroom over the estimate: measured peaks (docs/scale.json, 2 and 8 GB models) were 0.37-1.12x the
# estimate (GPTQ the highest), 0.25-0.68x the request with this margin.
MARGIN = 1.5
MEM_STEP = 256 << 20  # requests are rounded up to a quarter GiB, so submitit writes whole MB
MEM_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # sbatch --mem suffixes (default M)
COMMAND_SECONDS = 60  # sinfo and sacct answer in seconds; more means a cluster that hangs
VANISHED_SECONDS = 60  # a SLURM job neither queued nor in accounting this long has ended without a trace
POLL_SECONDS = 5


def build_memory(spec: dict) -> dict:
    """Peak bytes one build of the release needs, by phase, from its architecture alone (pure).

    Phases run one after the other, so the peak is the base plus the largest: streaming the weights
    (bytes in flight, or the largest tensor's source and output going through alone), calibrating
    (one decoder layer in FP32 twice, every window's hidden states in and out, and for GPTQ/imatrix
    the layer's Hessians plus a factorisation of the widest), evaluating (source and artifact whole
    in FP32, and one window's logits with their log-softmax for each).
    """
    arch, recipe = spec["model"]["architecture"], Recipe.of(spec["quant"])
    tensors = memory.checkpoint(arch)
    sizes = {t.name: math.prod(t.shape) for t in tensors}
    parameters = sum(sizes.values())
    # source and output bytes in flight (a larger tensor goes alone: its BF16 source and an output of at
    # most as many bytes), plus spare buffers; never more than the whole model read and written at once
    streamed = max(IN_FLIGHT_BYTES, 2 * SOURCE_BYTES * max(sizes.values())) + SPARE_BYTES
    phases = {"stream": min(streamed, 2 * SOURCE_BYTES * parameters)}
    if recipe.needs_calibration:
        layers = {}
        for name, count in sizes.items():
            found = re.match(r"model\.layers\.(\d+)\.", name)
            if found:
                layers[found.group(1)] = layers.get(found.group(1), 0) + count
        widest = max(layers, key=layers.get)
        inputs = [t.shape[1] for t in tensors if t.linear and t.name.startswith(f"model.layers.{widest}.")]
        calibration = spec["calibration"]
        tokens = calibration["samples"] * calibration["sequence_length"]
        hessians = (sum(n * n for n in inputs) + 2 * max(inputs) ** 2) * FP32 \
            if recipe.algorithm in ("gptq", "imatrix") else 0
        phases["calibration"] = 2 * layers[widest] * FP32 + 2 * tokens * arch["hidden_size"] * FP32 + hessians
    if spec["eval"]["dataset"] is not None:
        phases["eval"] = 2 * parameters * FP32 + 4 * spec["eval"]["sequence_length"] * arch["vocab_size"] * FP32
    peak = BASE_BYTES + max(phases.values())
    return {"phases": phases, "base": BASE_BYTES, "peak": peak,
            "request": -(-int(peak * MARGIN) // MEM_STEP) * MEM_STEP}


def job_request(spec: dict, slurm: dict, node_cpus: int | None = None) -> dict:
    """{"cpus_per_task", "mem_gb"} for one release's job: the build's torch threads (no more than
    the largest node has) and its memory estimate with the margin; `--slurm cpus_per_task=`,
    `mem_gb=` or `mem=` (sbatch syntax) override them."""
    cpus = TORCH_THREADS if node_cpus is None else max(1, min(TORCH_THREADS, node_cpus))
    mem_bytes = build_memory(spec)["request"]
    if "mem" in slurm:
        mem_bytes = slurm_mem_bytes(slurm["mem"])
    elif "mem_gb" in slurm:
        mem_bytes = slurm_mem_bytes(f"{slurm['mem_gb']}G", "mem_gb")
    cpus = slurm.get("cpus_per_task", cpus)
    if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        raise BuilderError(Problem("--slurm", "cpus_per_task", f"{cpus!r}: expected a whole number of CPUs, 1 or more"))
    return {"cpus_per_task": cpus, "mem_gb": mem_bytes / (1 << 30)}


def slurm_mem_bytes(value, key: str = "mem") -> int:
    """Bytes of an sbatch --mem value: a number with an optional K, M, G or T suffix (default M)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])?B?\s*", str(value), re.IGNORECASE)
    if not found:
        raise BuilderError(Problem("--slurm", key, f"{value!r}: expected a size such as 16G or 4096M"))
    return int(float(found.group(1)) * MEM_UNITS[(found.group(2) or "M").upper()])


def slurm_nodes(partition: str | None = None) -> list:
    """[{"name", "cpus", "mem_bytes"}] of every node (of the partition) as `sinfo` reports them."""
    command = ["sinfo", "-h", "-N", "-o", "%N %c %m", *(["-p", str(partition)] if partition else [])]
    answer = run(command, "--launcher", "slurm: `sinfo` does not answer")
    nodes = {}
    for line in answer.splitlines():
        name, cpus, mem = line.split()
        nodes[name] = {"name": name, "cpus": int(cpus), "mem_bytes": int(mem.rstrip("+")) << 20}
    if not nodes:
        where = f"partition {partition!r}" if partition else "the cluster"
        raise BuilderError(Problem("--slurm", "partition", f"{where} has no nodes (`sinfo -N`)"))
    return sorted(nodes.values(), key=lambda node: node["name"])


def run(command: list, key: str, failure: str, cwd: Path | None = None, timeout: float | None = COMMAND_SECONDS) -> str:
    """stdout of a command that must succeed (within timeout seconds); BuilderError with its first
    error line (else its last line) otherwise."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuilderError(Problem(key, "", f"{failure} ({error})")) from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        said = next((line for line in lines if "error" in line.lower()), lines[-1])
        raise BuilderError(Problem(key, "", f"{failure} ({said.strip()})"))
    return done.stdout


def cluster_nodes(partition: str | None = None) -> list:
    """The nodes jobs can go to; BuilderError when this is no place to submit SLURM jobs from: no
    sbatch, or accounting that does not answer (submitit polls `sacct`; without it a cancelled or
    failed job is waited for forever)."""
    if shutil.which("sbatch") is None:
        raise BuilderError(Problem("--launcher", "", "slurm: no `sbatch` on PATH; run on a SLURM login node"))
    run(["sacct", "-n", "-X", "-S", "now", "-o", "JobID"], "--launcher",
        "slurm: accounting does not answer; submitit reads job states with `sacct`, so a cancelled or "
        "failed job would be waited for forever; run slurmdbd (AccountingStorageType="
        "accounting_storage/slurmdbd)")
    return slurm_nodes(partition)


def request_problems(requests: dict, nodes: list) -> list:
    """A release whose request (CPUs, memory) no node holds: SLURM would leave it PENDING forever
    (CPUs) or refuse it at sbatch (memory). Pure."""
    found = []
    for release, request in requests.items():
        mem_bytes = round(request["mem_gb"] * (1 << 30))
        if any(n["cpus"] >= request["cpus_per_task"] and n["mem_bytes"] >= mem_bytes for n in nodes):
            continue
        shown = ", ".join(f"{n['name']} {n['cpus']} CPUs {n['mem_bytes'] / (1 << 30):.2f} GiB" for n in nodes[:4])
        found.append(Problem(f"specs/release/{release}.yaml", "", f"a job of {request['cpus_per_task']} CPUs "
                             f"and {request['mem_gb']:.2f} GiB fits no node ({shown}"
                             f"{', ...' if len(nodes) > 4 else ''}); lower --slurm cpus_per_task or mem_gb, "
                             "or choose a partition with larger nodes"))
    return found


def build_many(root: Path, releases: list, job, launcher: str = "local", slurm: dict | None = None,
               force: bool = False, folder: Path | None = None, log=print) -> list:
    """Submit one job per release, wait for all; returns their results in the order given.

    Args:
        job: job(root, release, force) -> result dict (or {"error": ..., "exit_code": ...}), run in each
            job's own process (builder.build.job; an importable function, so submitit pickles it by name).
        slurm: extra submitit SLURM parameters without the `slurm_` prefix (partition, account, ...).
        folder: where submitit keeps job files (default <root>/.fanout/<job id>).
    Raises BuilderError (exit 2) before submitting anything when the input or the cluster cannot
    work; after all jobs have ended, CheckFailed (exit 1) naming every release whose job failed or was
    cancelled (BuilderError when each was refused as bad input by its build).
    """
    results, failed = submit_and_wait(root, releases, job, launcher, slurm or {}, force, folder, log)
    raise_failed(failed)
    return results


def build_stale(root: Path, job, launcher: str = "local", slurm: dict | None = None, force: bool = False,
                folder: Path | None = None, log=print) -> list:
    """Build every release whose `build@` stage `dvc status` reports changed, then record the built
    ones in dvc.lock (`dvc commit -f build@...`, as `dvc repro` records them); returns their results."""
    releases = stale_releases(root)
    if not releases:
        log("nothing is stale: dvc.lock records every release as built")
        return []
    log(f"stale: {', '.join(releases)}")
    results, failed = submit_and_wait(root, releases, job, launcher, slurm or {}, force, folder, log)
    if results:
        record(root, [result["release"] for result in results], log)
    raise_failed(failed)
    return results


def submit_and_wait(root: Path, releases: list, job, launcher: str, slurm: dict, force: bool,
                    folder: Path | None, log) -> tuple:
    """(results of the jobs that built, Problems of those that did not, with their exit codes)."""
    import submitit

    known = list_releases(root)
    problems = [unknown_release(r, known) for r in releases if r not in known]
    if launcher not in LAUNCHERS:
        problems.append(Problem("--launcher", "", f"{launcher!r}; allowed: {', '.join(LAUNCHERS)}"))
    if problems:
        raise BuilderError(problems)
    specs = {release: cache.resolved(root, release, (), lambda r=release: resolve(root, r)) for release in releases}
    nodes = cluster_nodes(slurm.get("partition")) if launcher == "slurm" else None
    cpus = max(n["cpus"] for n in nodes) if nodes else os.cpu_count()  # local: this machine is the node
    requests = {release: job_request(spec, slurm, cpus) for release, spec in specs.items()}
    problems = request_problems(requests, nodes) if nodes else []
    if problems:
        raise BuilderError(problems)
    executor = submitit.AutoExecutor(folder=folder or root / JOBS_DIR / "%j", cluster=launcher)
    jobs = {}
    for request in sorted({tuple(sorted(r.items())) for r in requests.values()}):  # one array per request
        group = [release for release in releases if tuple(sorted(requests[release].items())) == request]
        extra = {f"slurm_{key}": value for key, value in slurm.items() if key not in ("cpus_per_task", "mem_gb", "mem")}
        try:
            executor.update_parameters(name="builder-build", **JOB, **dict(request), **extra)
        except NameError as error:  # submitit names the unknown parameter and lists the valid ones
            raise BuilderError(Problem("--slurm", "", str(error).splitlines()[0])) from None
        with quiet_job_bars():
            submitted = executor.map_array(job, [str(root)] * len(group), group, [force] * len(group))
        jobs.update(zip(group, submitted))
        log(f"submitted {len(group)} {launcher} job(s), {dict(request)['cpus_per_task']} CPU(s) and "
            f"{dict(request)['mem_gb']:.2f} GiB each: " + ", ".join(f"{r} {j.job_id}" for r, j in zip(group, submitted)))
    return collect([(release, jobs[release]) for release in releases], log)


@contextlib.contextmanager
def quiet_job_bars():
    """While jobs are submitted, console.BARS_OFF (TQDM_DISABLE=1, unless set): a job's stderr is its log file, and local
    processes and sbatch take the environment they are submitted in; this process's is put back."""
    name, value = BARS_OFF
    before = os.environ.get(name)
    os.environ.setdefault(name, value)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


def collect(jobs: list, log) -> tuple:
    """Wait for each (release, job); a job cancelled, killed or crashed is a failure naming the
    release, the job id, its state and its log (submitit reads the state with sacct)."""
    results, failed = [], []
    for release, submitted in jobs:
        where = f"specs/release/{release}.yaml"
        try:
            result = wait(submitted)
        except Exception as error:  # cancelled, killed, out of memory, a crash: submitit kept its output
            lines = [line for line in str(error).splitlines() if line.strip()]
            detail = lines[-1] if lines and "has not produced any output" not in str(error) else "no output"
            failed.append((1, Problem(where, "", f"job {submitted.job_id} ended without a result (state "
                                      f"{job_state(submitted)}: {detail}); its log: {submitted.paths.stderr}")))
            continue
        if "error" in result:
            failed.append((result.get("exit_code", 2), Problem(where, "", f"job {submitted.job_id}: {result['error']}")))
        else:
            log(f"{release}: built {result['content_digest']} in job {submitted.job_id}")
            results.append(result)
    return results, failed


def wait(submitted):
    """submitted.result(), but a SLURM job the scheduler no longer knows (no queue entry and no
    accounting row for VANISHED_SECONDS: an array task cancelled while it waited in its array leaves
    none) ends the wait with an error instead of holding it forever."""
    from submitit.slurm.slurm import SlurmJob

    unseen_since = None
    while not submitted.done():
        if not isinstance(submitted, SlurmJob) or job_state(submitted) != "UNKNOWN" or queued(submitted.job_id):
            unseen_since = None
        elif unseen_since is None:
            unseen_since = time.monotonic()
        elif time.monotonic() - unseen_since > VANISHED_SECONDS and not submitted.done(force_check=True):
            raise RuntimeError(f"neither queued nor in accounting for {VANISHED_SECONDS} s "
                               "(cancelled while pending?)")
        time.sleep(POLL_SECONDS)
    return submitted.result()


def queued(job_id: str) -> bool:
    """Whether squeue lists the job (pending, running or ending). Only the controller's own answer
    that it knows no such job means it is not listed: a controller that does not answer (restarting,
    unreachable: squeue fails too) is no evidence that the job is gone."""
    try:
        listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", job_id], capture_output=True, text=True,
                                timeout=COMMAND_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return True
    if listed.returncode:
        return "invalid job id" not in listed.stderr.lower()
    return bool(listed.stdout.strip())


def job_state(submitted) -> str:
    """The job's state as the cluster reports it (CANCELLED by 0, FAILED, ...), or UNKNOWN."""
    try:
        return submitted.state
    except Exception:  # the scheduler itself does not answer
        return "UNKNOWN"


def raise_failed(failed: list) -> None:
    """Raise once for every failed job: CheckFailed (exit 1) if any ran and failed, else BuilderError."""
    if failed:
        error = CheckFailed if any(code == 1 for code, _ in failed) else BuilderError
        raise error([problem for _, problem in failed])


def dvc(root: Path, *args: str) -> str:
    """stdout of `python -m dvc ARGS` in the repository (this interpreter's DVC); no time limit:
    hashing and caching large artifacts takes as long as it takes."""
    return run([sys.executable, "-m", "dvc", *args], "dvc.yaml", f"`dvc {' '.join(args)}` failed", cwd=root,
               timeout=None)


def stale_releases(root: Path) -> list:
    """Releases whose `build@` stage `dvc status` reports changed (`dvc repro` would run them), sorted.

    A stale `import@` stage is refused: imports run where the weights are, before any build."""
    status = json.loads(dvc(root, "status", "--json") or "{}")
    imports = sorted(stage for stage in status if stage.startswith("import@"))
    if imports:
        raise BuilderError([Problem("dvc.yaml", stage, f"stale; import first (`dvc repro {stage}`): "
                                    "build-many --stale builds releases only") for stage in imports])
    return sorted(stage.split("@", 1)[1] for stage in status if stage.startswith("build@"))


def record(root: Path, releases: list, log) -> None:
    """Record built releases in dvc.lock as `dvc repro` would (`dvc commit -f build@RELEASE ...`):
    their dependencies' and outputs' hashes, the outputs saved to the DVC cache."""
    stages = [f"build@{release}" for release in releases]
    try:
        dvc(root, "commit", "-f", *stages)
    except BuilderError as error:
        raise CheckFailed(error.problems) from None
    log(f"recorded in dvc.lock: {', '.join(stages)}")
