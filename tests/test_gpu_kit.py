"""The GPU proof kit (bench/gpu/): its CPU dry run, its table, and the wheels it packs for the GPU machine."""

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "bench" / "gpu"))

import pack  # noqa: E402
import table  # noqa: E402

HAS_LLMC = importlib.util.find_spec("llmcompressor") is not None
NO_LLMC = ("llmcompressor is not importable here (the project venv pins compressed-tensors 0.17, llm-compressor "
           "0.14 needs 0.19): its step runs on the GPU machine, in run.sh's second venv")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """bench/gpu/kit.py --device cpu, once: (its exit code, its output, its records)."""
    work = tmp_path_factory.mktemp("gpu-kit")
    command = [sys.executable, str(PROJECT / "bench" / "gpu" / "kit.py"), "--device", "cpu", "--work", str(work),
               "--json", str(work / "rows.json"), *(["--llmc", sys.executable] if HAS_LLMC else [])]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=3600)
    rows = json.loads((work / "rows.json").read_text()) if (work / "rows.json").is_file() else []
    return result.returncode, result.stdout + result.stderr, rows


def test_dry_run_builds_every_calibrated_release_twice_on_the_cpu_to_the_same_digest(dry_run):
    code, output, rows = dry_run
    assert code == 0, output
    built = {}
    for row in rows:
        if row["tool"] == "builder":
            assert row.get("code") == 0 and "skipped" not in row, row
            built.setdefault((row["model"], row["recipe"]), []).append(row["content_digest"])
    assert set(built) == {(model, recipe) for model in ("llama-8b-shaped", "small-llama")
                          for recipe in ("w4a16-gptq", "fp8-static")}
    for digests in built.values():
        assert len(digests) == 2 and digests[0] == digests[1] and digests[0].startswith("sha256:")
    assert all("calibration.device=cpu" in row["argv"] for row in rows if row["tool"] == "builder")


def test_dry_run_prints_one_table_with_seconds_per_layer_memory_and_identical_twice(dry_run):
    code, output, rows = dry_run
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert lines[0] == table.HEADER.splitlines()[0] and lines[1] == table.HEADER.splitlines()[1]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    builder_rows = [row for row in cells if row[2] == "builder"]
    assert len(builder_rows) == 4
    for model, recipe, tool, layers, per_layer, runs, gpu, rss, same in builder_rows:
        assert layers == "2" and float(per_layer) > 0 and len(runs.split(", ")) == 2
        assert gpu == "-" and float(rss) > 0 and same == "yes"  # no CUDA on the dry run: no GPU figure
    assert re.search(r"device: cpu \(CPU dry run\); calibration 4 x 64 tokens", output)


def test_dry_run_runs_llm_compressor_gptq_on_the_same_checkpoint_and_windows(dry_run):
    if not HAS_LLMC:
        pytest.skip(NO_LLMC)
    code, output, rows = dry_run
    theirs = [row for row in rows if row["tool"] == "llm-compressor"]
    assert {row["model"] for row in theirs} == {"llama-8b-shaped", "small-llama"}
    assert all(row["code"] == 0 and row["work_seconds"] > 0 for row in theirs), theirs


def machine_distributions() -> set:
    """What the GPU machine has: its packages and, as pip installs them, everything they require
    (markers evaluated for Linux), but for what it is known to lack (pack.ABSENT)."""
    environment, found, todo = default_environment(), set(), list(pack.MACHINE)
    while todo:
        name = normalised(todo.pop())
        if name in found or name in pack.ABSENT:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not in this venv (pandas): what it requires plays no part in a build
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
                todo.append(requirement.name)
    return found


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_packed_builder_wheels_are_exactly_what_builds_import_or_read_that_the_gpu_machine_lacks(dry_run):
    code, output, rows = dry_run
    used = set()
    for row in rows:
        if row["tool"] == "builder" and row.get("code") == 0:
            used |= set(row["packages"]) | {normalised(name) for name in row["toolchain"]}
    lacking = used - machine_distributions() - set(pack.OPTIONAL) - {"quant-release-builder"}
    assert lacking == set(pack.BUILDER)
    pinned = [Requirement(text) for text in tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {normalised(requirement.name): str(requirement.specifier).removeprefix("==") for requirement in pinned}
    # What a pinned package itself requires with == (pydantic: pydantic-core==2.50.5; omegaconf: antlr4==4.9.*)
    held = {normalised(Requirement(text).name) for requirement in pinned for text in metadata.requires(requirement.name) or []
            if any(clause.operator == "==" for clause in Requirement(text).specifier)}
    for name, version in pack.BUILDER.items():
        # A kit version nothing pins drifts on a clean clone's install (loguru 0.8.0 did): pin it in pyproject.toml
        assert name in pins or name in held, f"{name} is in the kit but neither pyproject.toml nor a pinned package pins it"
        assert version == pins.get(name, metadata.version(name)), name  # pinned, or as its pinned dependent holds it


def test_packed_sets_leave_out_torch_and_everything_the_gpu_machine_has():
    present = machine_distributions()
    for name, wheels in pack.SETS.items():
        assert not set(wheels) & present, name
        assert "torch" not in wheels and "llmcompressor" in pack.LLMC
    assert pack.LLMC["compressed-tensors"] == "0.19.0" and pack.BUILDER["compressed-tensors"] == "0.17.0"


def test_table_says_which_runs_were_skipped_failed_or_differed():
    models = {"m": {"layers": 4}}
    base = {"model": "m", "tool": "builder", "layers": 4}
    rows = [{**base, "recipe": "a", "attempt": 1, "code": 0, "seconds": 10.0, "work_seconds": 8.0,
             "peak_gpu_bytes": 3 << 30, "peak_rss_bytes": 1 << 30, "content_digest": "sha256:1"},
            {**base, "recipe": "a", "attempt": 2, "code": 0, "seconds": 9.0, "work_seconds": 7.0,
             "peak_gpu_bytes": 3 << 30, "peak_rss_bytes": 1 << 30, "content_digest": "sha256:2"},
            {**base, "recipe": "b", "attempt": 1, "code": 1, "error": "RuntimeError: boom", "seconds": 1.0,
             "peak_gpu_bytes": None, "peak_rss_bytes": 1 << 30},
            {**base, "recipe": "b", "attempt": 2, "skipped": "past the 500 s budget"}]
    text, ok = table.markdown(rows, models)
    lines = text.splitlines()
    assert lines[2] == "| m | a | builder | 4 | 2.00 | 10.0, 9.0 | 3.00 | 1.00 | NO |"
    assert "FAILED (RuntimeError: boom), skipped (past the 500 s budget)" in lines[3]
    assert lines[3].endswith("| not run twice |") and not ok


def test_pack_keeps_the_wheels_it_has_and_drops_those_the_list_no_longer_names(tmp_path):
    current = tmp_path / "charset_normalizer-3.5.3-cp312-cp312-manylinux_2_28_x86_64.whl"
    stale = tmp_path / "charset_normalizer-3.4.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    other = tmp_path / "loguru-0.7.3-py3-none-any.whl"
    for wheel in (current, stale, other):
        wheel.write_bytes(b"")
    wanted = {"charset-normalizer": "3.5.3", "loguru": "0.7.3"}
    pack.drop_stale(wanted, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current.name, other.name])
    pack.download(wanted, tmp_path, "3.12")  # every wheel there: nothing to fetch (no pip, no network)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current.name, other.name])
