"""The artifact_id: what it covers (spec, input digests, the toolchain and output versions of the parts a
release runs) and what it leaves out (the builder's own code)."""

import json
import subprocess
import sys

import pytest

from builder.release import identity, lock
from conftest import PROJECT

RELEASE_PARTS = {  # shipped release -> the parts it runs
    "smollm2-135m-instruct-bf16": {"layout", "release-files", "math", "format.dense"},
    "smollm2-135m-instruct-fp8-dynamic": {"layout", "release-files", "math", "format.compressed-tensors", "quantize.float"},
    "smollm2-135m-instruct-fp8-static": {"layout", "release-files", "math", "format.compressed-tensors", "quantize.float",
                                         "calibration", "data", "evaluation"},
    "smollm2-135m-instruct-w4a16": {"layout", "release-files", "math", "format.compressed-tensors", "quantize.int",
                                    "data", "evaluation"},
    "smollm2-135m-instruct-w4a16-gptq": {"layout", "release-files", "math", "format.compressed-tensors", "quantize.int",
                                         "gptq", "calibration", "data", "evaluation"},
    "smollm2-135m-instruct-gguf-q8_0": {"layout", "release-files", "math", "format.gguf", "quantize.ggml", "data",
                                        "evaluation"},
    "smollm2-135m-instruct-gguf-q4_0": {"layout", "release-files", "math", "format.gguf", "quantize.ggml", "imatrix",
                                        "calibration", "data", "evaluation"},
    "smollm2-135m-instruct-mlx-4bit": {"layout", "release-files", "math", "format.mlx", "quantize.affine", "data",
                                       "evaluation"},
}


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.parametrize("release", sorted(RELEASE_PARTS))
def test_a_release_carries_the_versions_of_exactly_the_parts_it_runs(release):
    entry = lock.read(PROJECT, release)
    assert set(entry["inputs"]["versions"]) == RELEASE_PARTS[release]
    assert set(entry["inputs"]) == set(identity.INPUT_KEYS)  # no builder code digest among the inputs


def test_tokenizers_and_compressed_tensors_enter_only_the_ids_of_releases_that_use_them():
    toolchains = {release: lock.read(PROJECT, release)["inputs"]["toolchain"] for release in RELEASE_PARTS}
    assert "tokenizers" in toolchains["smollm2-135m-instruct-fp8-static"]  # calibration and eval token ids
    assert "tokenizers" not in toolchains["smollm2-135m-instruct-fp8-dynamic"]
    assert "compressed-tensors" not in toolchains["smollm2-135m-instruct-bf16"]
    assert all("torch" in toolchain for toolchain in toolchains.values())


def test_the_builders_code_digest_does_not_enter_the_artifact_id(monkeypatch):
    release = "smollm2-135m-instruct-fp8-dynamic"
    before = lock.lock_entry(PROJECT, release)
    monkeypatch.setattr(identity, "builder_digest", lambda: "sha256:" + "1" * 64)
    assert lock.lock_entry(PROJECT, release) == before


SMALL_DATA = ["calibration.samples=2", "calibration.sequence_length=32", "eval=docstrings", "eval.samples=1",
              "eval.sequence_length=32", "eval.gate.max_perplexity_increase_pct=null", "eval.gate.max_mean_kl=null"]


def test_every_package_a_build_imports_is_in_its_toolchain_or_known_to_leave_bytes_alone(calib_repo, tmp_path):
    assert_known_imports(calib_repo, "tiny-llama-fp8-static", SMALL_DATA, tmp_path)


def test_gguf_and_mlx_builds_import_only_packages_of_their_toolchain_or_known_to_leave_bytes_alone(tmp_path):
    from conftest import Repo, release_text

    repo = Repo.fresh(tmp_path / "repo")
    repo.add_model("tiny-llama", tokenizer="bpe")
    for name, quant, target, calibration in (("gguf", "gguf-q4_0", "llama-cpp", "licenses"),
                                             ("mlx", "mlx-4bit", "mlx", "none")):
        text = release_text(name, "tiny-llama", quant, target)
        (repo.root / "specs" / "release" / f"{name}.yaml").write_text(
            text.replace("\n\nrelease:", f"\n  - override /calibration: {calibration}\n\nrelease:"))
        overrides = SMALL_DATA if calibration != "none" else SMALL_DATA[2:]
        assert_known_imports(repo, name, overrides, tmp_path / name)


def assert_known_imports(repo, release: str, overrides: list, out) -> None:
    """Build release in a fresh process; every package it imported is in the toolchain or inert."""
    script = ("import importlib.metadata as m, json, sys\n"
              "from builder.cli import main\n"
              "code = main(sys.argv[1:])\n"
              "found = m.packages_distributions()\n"
              "print(json.dumps({'code': code, 'packages': sorted({d for name in list(sys.modules) "
              "for d in found.get(name.split('.')[0], [])})}))\n")
    result = subprocess.run([sys.executable, "-c", script, "build", release, *overrides,
                             "--out", str(out / "a")], cwd=repo.root, capture_output=True, text=True,
                            env={**calib_repo_environment(), "BUILDER_CACHE": "off"})
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["code"] == 0, result.stderr
    entry = lock.lock_entry(repo.root, release, tuple(overrides))
    known = set(entry["inputs"]["toolchain"]) | set(identity.INERT_PACKAGES)
    unknown = sorted({normalised(p) for p in outcome["packages"]} - known)
    assert not unknown, (f"a build imports {unknown}: add each to the PART_PACKAGES of the part that uses it, "
                         "or to INERT_PACKAGES with why it cannot change bytes (builder/release/identity.py)")


def calib_repo_environment() -> dict:
    import os

    return {**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT)}
