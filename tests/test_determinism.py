"""The CPU math a build pins is the math that runs: MKL takes the branch MKL_CBWR asks for on this CPU,
whatever its vendor, and a process where it runs another is refused before anything is written."""

import subprocess
import sys

import pytest

from builder import determinism
from conftest import PROJECT

# What a fresh process sees after the CLI's settings, with one GEMM run (MKL settles its branch then).
PROBE = ("import sys; sys.path.insert(0, {project!r}); from builder import determinism; {before}"
         "import torch; torch.ones(64, 64) @ torch.ones(64, 64); print(determinism.mkl_branch())")


def branch_in_fresh_process(before: str = "determinism.apply_environment(); ") -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(project=str(PROJECT), before=before)],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_mkl_runs_the_branch_the_builder_pins_on_this_cpu():
    # AVX2,STRICT (math 2) failed here on AMD EPYC: MKL honours it on Intel CPUs only and ran AUTO,STRICT
    branch = branch_in_fresh_process()
    if branch == "None":
        pytest.skip("this torch has no MKL (MKL_CBWR means nothing to it)")
    assert branch == determinism.ENVIRONMENT["MKL_CBWR"] == "COMPATIBLE"


def test_a_build_whose_mkl_already_runs_another_branch_is_refused_with_nothing_written(repo, tmp_path):
    if branch_in_fresh_process() == "None":
        pytest.skip("this torch has no MKL")
    repo.add_model("tiny-llama")
    out = tmp_path / "out"
    # torch loaded and MKL settled on AUTO before the builder could set MKL_CBWR: a library caller's mistake
    script = (f"import os, sys; sys.path.insert(0, {str(PROJECT)!r}); os.environ['MKL_CBWR'] = 'AUTO'; "
              "import torch; torch.ones(64, 64) @ torch.ones(64, 64); from builder.cli import main; "
              f"sys.exit(main(['build', 'tiny-llama-fp8-dynamic', '--out', {str(out)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=repo.root, capture_output=True, text=True,
                            env={"BUILDER_ROOT": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    refusal = "builder build: error: builder/determinism.py: MKL_CBWR: COMPATIBLE asked, but MKL runs its AUTO branch"
    assert result.stderr.strip().splitlines()[-1].startswith(refusal), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing published, staging removed
