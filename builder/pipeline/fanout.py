"""Build several releases in parallel through submitit: local processes here, SLURM jobs on a cluster.

    builder build-many REL... [--launcher local|slurm] [--slurm partition=cpu --slurm array_parallelism=8]
"""

import shutil
from pathlib import Path

from builder.errors import BuilderError, Problem
from builder.release.resolve import list_releases

LAUNCHERS = ("local", "slurm")  # submitit executor names
JOB = {"timeout_min": 240, "cpus_per_task": 2, "mem_gb": 16}  # per release; peak memory ~ largest layer
JOBS_DIR = ".fanout"  # submitit's pickles and logs, one folder per job (on a shared disk for SLURM)


def build_many(root: Path, releases: list, job, launcher: str = "local", slurm: dict | None = None,
               force: bool = False, folder: Path | None = None, log=print) -> list:
    """Submit one job per release, wait for all; returns their results in the order given.

    Args:
        job: job(root, release, force) -> result dict (or {"error": ...}), run in each job's own
            process (builder.build.job; an importable function, so submitit pickles it by name).
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
    jobs = executor.map_array(job, [str(root)] * len(releases), releases, [force] * len(releases))
    log(f"submitted {len(jobs)} {launcher} jobs: {', '.join(j.job_id for j in jobs)}")
    results, failed = [], []
    for release, submitted in zip(releases, jobs):
        try:
            result = submitted.result()
        except Exception:  # killed, out of memory, a crash: submitit kept its output
            result = {"error": f"crashed; see {submitted.paths.stderr}"}
        if "error" in result:
            failed.append(Problem(f"specs/release/{release}.yaml", "", f"job {submitted.job_id}: {result['error']}"))
        else:
            results.append(result)
    if failed:
        raise BuilderError(failed)
    return results
