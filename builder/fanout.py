"""Build several releases in parallel through submitit: local processes here, SLURM jobs on a cluster.

    builder build-many REL... [--launcher local|slurm] [--slurm partition=cpu --slurm array_parallelism=8]
"""

import os
import shutil
from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.resolve import list_releases

LAUNCHERS = ("local", "slurm")  # submitit executor names
JOB = {"timeout_min": 240, "cpus_per_task": 2, "mem_gb": 16}  # per release; peak memory ~ largest layer
JOBS_DIR = ".fanout"  # submitit's pickles and logs, one folder per job (on a shared disk for SLURM)


def build_job(root: str, release: str, force: bool) -> dict:
    """What one job runs, in its own process: the same build as `builder build RELEASE`."""
    from builder import determinism

    determinism.apply_environment()  # before the build imports torch in this fresh process
    from builder.build import build
    from builder.cli import log  # to stderr, which submitit keeps as the job's log

    try:
        result = build(Path(root), release, force=force, log=log)
    except BuilderError as error:  # bad input comes back as a value the submitter reports
        return {"release": release, "error": error.render(), "pid": os.getpid()}
    return {"release": release, "content_digest": result["content_digest"],
            "artifact_id": result["artifact_id"], "pid": os.getpid()}


def build_many(root: Path, releases: list, launcher: str = "local", slurm: dict | None = None,
               force: bool = False, folder: Path | None = None, log=print) -> list:
    """Submit one job per release, wait for all; returns their results in the order given.

    Args:
        slurm: extra submitit SLURM parameters without the `slurm_` prefix (partition, account, ...).
        folder: where submitit keeps job files (default <root>/.fanout/<job id>).
    Raises BuilderError naming every release whose job failed, after all jobs have ended.
    """
    import submitit

    problems = [Problem(f"specs/release/{r}.yaml", "", "no such release") for r in releases
                if r not in list_releases(root)]
    if launcher not in LAUNCHERS:
        problems.append(Problem("--launcher", "", f"{launcher!r}; allowed: {', '.join(LAUNCHERS)}"))
    if launcher == "slurm" and shutil.which("sbatch") is None:
        problems.append(Problem("--launcher", "", "slurm: no `sbatch` on PATH; run on a SLURM login node"))
    if problems:
        raise BuilderError(problems)
    executor = submitit.AutoExecutor(folder=folder or root / JOBS_DIR / "%j", cluster=launcher)
    try:
        executor.update_parameters(name="builder-build", **JOB,
                                   **{f"slurm_{key}": value for key, value in (slurm or {}).items()})
    except NameError as error:  # submitit names the unknown parameter and lists the valid ones
        raise BuilderError(Problem("--slurm", "", str(error).splitlines()[0])) from None
    jobs = executor.map_array(build_job, [str(root)] * len(releases), releases, [force] * len(releases))
    log(f"submitted {len(jobs)} {launcher} jobs: {', '.join(job.job_id for job in jobs)}")
    results, failed = [], []
    for release, job in zip(releases, jobs):
        try:
            result = job.result()
        except Exception:  # killed, out of memory, a crash: submitit kept its output
            result = {"error": f"crashed; see {job.paths.stderr}"}
        if "error" in result:
            failed.append(Problem(f"specs/release/{release}.yaml", "", f"job {job.job_id}: {result['error']}"))
        else:
            results.append(result)
    if failed:
        raise BuilderError(failed)
    return results
