"""Golden bytes: every part of the builder that writes bytes is held to the version it claims.

Every shipped recipe (and the legacy fp8 layout, the GGUF and MLX types, and evaluated builds) is built
on tiny checkpoints of two architectures (a recipe written for one family, on a tiny checkpoint of it); the digests of its files (manifest.json and provenance.json included) must equal tests/golden.json, keyed by the
output versions and toolchain each build's artifact_id carries. A change of bytes without a bump of the part that made it
fails here and names the parts to look at; after bumping, regenerate the table:

    UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py      # then commit tests/golden.json
"""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from builder import build
from builder.canonical import pretty_json, sha256_file
from builder.paths import MANIFEST_FILE, PROVENANCE_FILE
from builder.quant import quantize
from builder.release import identity, lock
from conftest import FAMILIES, Repo

GOLDEN = Path(__file__).with_name("golden.json")
ARCHITECTURES = ("tiny-llama", "tiny-qwen2")
SMALL_CALIBRATION = {"calibration": {"samples": 4, "sequence_length": 64}}
# The K-quant mixes build on wider checkpoints of the same architectures: ffn_down's rows of 512 values hold
# super-blocks of 256 (Q4_K / Q5_K, Q6_K on the last layer), the other Linears' rows of 64 fall back to blocks
# of 32 (Q5_0 / Q5_1, Q8_0). The shipped llama-cpp target lists no w5a16-int (see the Q5_K_M release).
WIDE = {"tiny-llama": ("llama", dict(intermediate_size=512, num_key_value_heads=4, tie_word_embeddings=False)),
        "tiny-qwen2": ("qwen2", dict(intermediate_size=512, tie_word_embeddings=True))}
Q5_TARGET = {"target": {"schemes": ["w16a16", "w8a16-int", "w5a16-int", "w4a16-int"]}}
# The tiny models' Linears (64 and 128 features; 32 k/v rows) hold whole 32x32 blocks, not 128x128 ones.
BLOCKS_32 = {"quant": {"weights": {"block_structure": [32, 32]}, "input_activations": {"group_size": 32}}}
# case -> (quant option, calibration option, eval option, extra release keys)
RECIPES = {
    "bf16": ("bf16", "none", "none", {}),
    "fp8-dynamic": ("fp8-dynamic", "none", "none", {}),
    "fp8-static": ("fp8-static", "licenses", "none", SMALL_CALIBRATION),
    "fp8-legacy": ("fp8-static", "licenses", "none", {**SMALL_CALIBRATION, "quant": {"format": "fp8"}}),
    "w8a8-int8": ("w8a8-int8", "none", "none", {}),
    "w4a16": ("w4a16", "none", "none", {"quant": {"weights": {"group_size": 32}}}),
    "w4a16-gptq": ("w4a16-gptq", "licenses", "none",
                   {**SMALL_CALIBRATION, "quant": {"weights": {"group_size": 32}}}),
    "w4a16-mse": ("w4a16", "none", "none", {"quant": {"weights": {"group_size": 32, "observer": "mse"}}}),
    "fp8-dynamic-gptq-imatrix": ("fp8-dynamic-gptq-imatrix", "licenses", "none", SMALL_CALIBRATION),
    "fp8-static-gptq-imatrix": ("fp8-static-gptq-imatrix", "licenses", "none", SMALL_CALIBRATION),
    "w8a8-int8-gptq-imatrix": ("w8a8-int8-gptq-imatrix", "licenses", "none", SMALL_CALIBRATION),
    "w4a16-gptq-imatrix": ("w4a16-gptq-imatrix", "licenses", "none",
                           {**SMALL_CALIBRATION, "quant": {"weights": {"group_size": 32}}}),
    "w4a16-awq-gptq-imatrix": ("w4a16-awq-gptq-imatrix", "licenses", "none",
                               {**SMALL_CALIBRATION, "quant": {"weights": {"group_size": 32}}}),
    "w8a8-int8-smoothquant": ("w8a8-int8-smoothquant", "licenses", "none", SMALL_CALIBRATION),
    "w8a8-int8-smoothquant-gptq-imatrix": ("w8a8-int8-smoothquant-gptq-imatrix", "licenses", "none",
                                           SMALL_CALIBRATION),
    "fp8-dynamic-evaluated": ("fp8-dynamic", "none", "docstrings", {"eval": {
        "samples": 2, "sequence_length": 64,
        "gate": {"max_perplexity_increase_pct": None, "max_mean_kl": None}}}),
    "gguf-bf16": ("gguf-q8_0", "none", "none", {"quant": {"weights": None, "algorithm": None}}),
    "gguf-q8_0": ("gguf-q8_0", "none", "none", {}),
    "gguf-q4_0-rtn": ("gguf-q4_0", "none", "none", {"quant": {"algorithm": "rtn"}}),
    "gguf-q4_0-imatrix": ("gguf-q4_0", "licenses", "none", SMALL_CALIBRATION),
    "gguf-q8_0-evaluated": ("gguf-q8_0", "none", "docstrings", {"eval": {
        "samples": 2, "sequence_length": 64,
        "gate": {"max_perplexity_increase_pct": None, "max_mean_kl": None}}}),
    "gguf-q4_k_m-rtn": ("gguf-q4_k_m", "none", "none", {"quant": {"algorithm": "rtn"}}),
    "gguf-q4_k_m-imatrix": ("gguf-q4_k_m", "licenses", "none", SMALL_CALIBRATION),
    "gguf-q5_k_m-rtn": ("gguf-q5_k_m", "none", "none", {"quant": {"algorithm": "rtn"}, **Q5_TARGET}),
    "gguf-q5_k_m-imatrix": ("gguf-q5_k_m", "licenses", "none", {**SMALL_CALIBRATION, **Q5_TARGET}),
    "fp8-block": ("fp8-block", "none", "none", BLOCKS_32),
    "fp8-block-legacy": ("fp8-block-legacy", "none", "none", BLOCKS_32),
    "nvfp4a16": ("nvfp4a16", "none", "none", {}),
    "nvfp4": ("nvfp4", "licenses", "none", SMALL_CALIBRATION),
    "nvfp4a16-gptq-imatrix": ("nvfp4a16-gptq-imatrix", "licenses", "none", SMALL_CALIBRATION),
    "nvfp4-gptq-imatrix": ("nvfp4-gptq-imatrix", "licenses", "none", SMALL_CALIBRATION),
    "nvfp4a16-gptq-asymmetric": ("nvfp4a16-gptq-imatrix", "licenses", "none",
                                 {**SMALL_CALIBRATION, "quant": {"gptq": {"asymmetric": True}}}),
    "mxfp4a16": ("mxfp4a16", "none", "none", {}),
    "mxfp4": ("mxfp4", "none", "none", {}),
    "mxfp8": ("mxfp8", "none", "none", {}),
    "w4afp8": ("w4afp8", "none", "none", {"quant": {"weights": {"group_size": 32}}}),
    "mlx-4bit": ("mlx-4bit", "none", "none", {}),
    "mlx-8bit-g32": ("mlx-4bit", "none", "none", {"quant": {"weights": {"num_bits": 8, "group_size": 32}}}),
    "mlx-4bit-evaluated": ("mlx-4bit", "none", "docstrings", {"eval": {
        "samples": 2, "sequence_length": 64,
        "gate": {"max_perplexity_increase_pct": None, "max_mean_kl": None}}}),
    "mlx-mxfp4": ("mlx-mxfp4", "none", "none", {}),
    "mlx-nvfp4": ("mlx-nvfp4", "none", "none", {}),
    "mlx-mxfp8": ("mlx-mxfp8", "none", "none", {}),
    "mlx-nvfp4-evaluated": ("mlx-nvfp4", "none", "docstrings", {"eval": {
        "samples": 2, "sequence_length": 64,
        "gate": {"max_perplexity_increase_pct": None, "max_mean_kl": None}}}),
    "gpt-oss-mxfp4": ("gpt-oss-mxfp4", "none", "none", {}),
    "gpt-oss-w4a16-gptq": ("w4a16-gptq", "licenses", "none",
                           {**SMALL_CALIBRATION, "quant": {"weights": {"group_size": 32}}}),
}
# Recipes written for one family only, on a tiny checkpoint of it instead of ARCHITECTURES' (gpt-oss's own
# MXFP4: its fused experts, 64 x 64 per expert, hold whole groups of 32; its experts split under vLLM's names).
ONLY_ON = {"gpt-oss-mxfp4": "tiny-gpt-oss", "gpt-oss-w4a16-gptq": "tiny-gpt-oss"}
ONLY_FAMILIES = {"tiny-gpt-oss": ("gpt_oss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                   intermediate_size=64, sliding_window=8))}
# Cases for the on-device runtimes: their target, and the tiny model with a byte-level BPE vocabulary
# (conftest.save_bpe_tokenizer: a GGUF vocabulary needs merges); the others build for vllm-h100.
# mlx's float modes build for mlx-fp.
ON_DEVICE = {case: "llama-cpp" if case.startswith("gguf") else "mlx" if RECIPES[case][0] == "mlx-4bit" else "mlx-fp"
             for case in RECIPES if case.startswith(("gguf", "mlx"))}
# Cases for targets other than vllm-h100: block-wise FP8's kernel family (w8a8-fp8-block) is listed by vllm-h200.
TARGETS = {case: "vllm-h200" for case in RECIPES if case.startswith("fp8-block")}
# NVFP4 and MX (FP4 and MX tensor cores) build for the Blackwell target, W4AFP8 for Grace Hopper's.
TARGETS.update({case: "vllm-b200" for case in RECIPES if case.startswith(("nvfp4", "mxfp"))})
TARGETS.update({case: "vllm-gh200" for case in RECIPES if case.startswith(("w4afp8", "gpt-oss"))})
PAIRS = tuple((arch, recipe) for arch in (*ARCHITECTURES, *ONLY_FAMILIES) for recipe in RECIPES
              if ONLY_ON.get(recipe, arch) == arch and (arch in ARCHITECTURES or recipe in ONLY_ON))
CASES = tuple(f"golden-{arch}-{recipe}" for arch, recipe in PAIRS)
# Files that list the others' digests: a change elsewhere changes them too, so they are suspects only alone.
DERIVED = (MANIFEST_FILE, PROVENANCE_FILE)
# Which parts decide each kind of file (the diagnosis names those the failing case runs).
FILE_PARTS = (
    (lambda path: path.endswith(".safetensors") or path.endswith(".index.json"),
     ("layout", "format.", "quantize.", "gptq", "gptq.", "observer.", "smoothing", "awq", "calibration", "data")),
    (lambda path: path.endswith(".gguf"), ("format.", "quantize.", "imatrix", "calibration", "data")),
    (lambda path: path == "config.json", ("layout", "format.")),
    (lambda path: path in ("release.json", "serve.json", "README.md"), ("release-files",)),
    (lambda path: path in DERIVED, ("release-files", "math")),
    (lambda path: path == "eval.json", ("evaluation", "data", "quantize.", "format.")),
    (lambda path: True, ("layout",)),
)


def release_yaml(name: str, arch: str, recipe: str) -> str:
    quant, calibration, evaluation, extra = RECIPES[recipe]
    model, target = (f"{arch}-bpe", ON_DEVICE[recipe]) if recipe in ON_DEVICE else (arch, TARGETS.get(recipe, "vllm-h100"))
    if "_k_m" in recipe:
        model = f"{arch}-wide-bpe"
    defaults = [{"override /model": model}, {"override /quant": quant}, {"override /target": target},
                {"override /calibration": calibration}, {"override /eval": evaluation}]
    document = {"defaults": defaults, "release": {"name": name, "version": "0.0.1"}, **extra}
    return "# @package _global_\n" + yaml.safe_dump(document, sort_keys=False)


@pytest.fixture(scope="session")
def golden_repo(tmp_path_factory) -> Repo:
    """The tiny checkpoints (each with a byte-level tokenizer, so calibration reads real text) and one
    release per case."""
    repo = Repo.fresh(tmp_path_factory.mktemp("golden") / "repo")
    for arch in ARCHITECTURES:
        repo.add_model(arch, tokenizer=True)
        repo.add_model(arch, tokenizer="bpe", name=f"{arch}-bpe")
        FAMILIES[f"{arch}-wide"] = WIDE[arch]
        repo.add_model(f"{arch}-wide", tokenizer="bpe", name=f"{arch}-wide-bpe")
        del FAMILIES[f"{arch}-wide"]
    for kind, family in ONLY_FAMILIES.items():
        FAMILIES[kind] = family
        repo.add_model(kind, tokenizer=True)
        del FAMILIES[kind]
    for arch, recipe in PAIRS:
        name = f"golden-{arch}-{recipe}"
        (repo.root / "specs" / "release" / f"{name}.yaml").write_text(release_yaml(name, arch, recipe))
    return repo


def build_case(repo: Repo, case: str, out: Path) -> dict:
    """The manifest of a build of case, its files listing manifest.json and provenance.json too (the DVC
    output holds them: their bytes are promised as well)."""
    manifest = build.build(repo.root, case, out=out, log=lambda message: None)
    derived = [{"path": name, "sha256": sha256_file(out / name)} for name in DERIVED]
    return {**manifest, "files": manifest["files"] + derived}


@pytest.fixture(scope="session")
def golden_builds(golden_repo, tmp_path_factory) -> dict:
    """case -> manifest of its build."""
    out = tmp_path_factory.mktemp("golden-builds")
    return {case: build_case(golden_repo, case, out / case) for case in CASES}


def entry_of(manifest: dict) -> dict:
    """What the table keeps of a build: the versions and toolchain it claims, and its bytes."""
    return {"versions": manifest["inputs"]["versions"], "toolchain": manifest["inputs"]["toolchain"],
            "spec_digest": manifest["spec_digest"], "content_digest": manifest["content_digest"],
            "files": {e["path"]: e["sha256"] for e in manifest["files"]}}


def suspects(path: str, versions: dict) -> list:
    """The parts a case runs that decide a file's bytes."""
    prefixes = next(parts for matches, parts in FILE_PARTS if matches(path))
    return sorted(part for part in versions if any(part == p or (p.endswith(".") and part.startswith(p))
                                                   for p in prefixes))


def golden_problems(case: str, manifest: dict, table: dict) -> list:
    """Why a build of case disagrees with the golden table ([] when it agrees)."""
    now, then = entry_of(manifest), table.get(case)
    if then is None:
        return [f"{case}: not in {GOLDEN.name}; regenerate it (UPDATE_GOLDEN=1)"]
    moved = [f"{key} {then[group].get(key)} -> {now[group].get(key)}" for group in ("versions", "toolchain")
             for key in sorted(set(then[group]) | set(now[group])) if then[group].get(key) != now[group].get(key)]
    if moved:
        return [f"{case}: {GOLDEN.name} holds other output versions or toolchain ({', '.join(moved)}); "
                "regenerate it (UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py) and commit it with the bump"]
    if now["spec_digest"] != then.get("spec_digest"):
        return [f"{case}: its resolved spec changed (a shipped spec file it uses changed, not the builder's code); "
                "regenerate the table (UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py)"]
    if now["files"] == then["files"]:
        return []
    changed = sorted(path for path in set(now["files"]) | set(then["files"])
                     if now["files"].get(path) != then["files"].get(path))
    changed = [path for path in changed if path not in DERIVED] or changed
    parts = sorted({part for path in changed for part in suspects(path, now["versions"])})
    return [f"{case}: bytes changed without a version bump: {', '.join(changed)} differ; the parts that write "
            f"them here: {', '.join(parts)}. Bump the one you changed in builder/release/identity.py "
            "OUTPUT_VERSIONS, then regenerate the table (UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py)"]


def test_every_shipped_recipe_writes_the_bytes_its_output_versions_promise(golden_builds):
    table = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("UPDATE_GOLDEN"):
        refused = [problem for case, manifest in golden_builds.items()
                   for problem in golden_problems(case, manifest, table) if "without a version bump" in problem]
        if refused and os.environ["UPDATE_GOLDEN"] != "force":
            pytest.fail("not regenerating: bytes changed without a version bump (UPDATE_GOLDEN=force overrides):\n"
                        + "\n".join(refused))
        table = {case: entry_of(m) for case, m in sorted(golden_builds.items())}
        GOLDEN.write_text(pretty_json(table))
    problems = [p for case, manifest in golden_builds.items() for p in golden_problems(case, manifest, table)]
    assert not problems, "\n".join(problems)
    assert sorted(table) == sorted(CASES), f"{GOLDEN.name} holds cases this test no longer builds"


def test_every_shipped_recipe_and_format_has_a_golden_case():
    from conftest import PROJECT

    shipped = {p.stem for p in (PROJECT / "specs" / "quant").glob("*.yaml")}
    assert shipped <= {quant for quant, _, _, _ in RECIPES.values()}
    assert {extra.get("quant", {}).get("format") for *_, extra in RECIPES.values()} >= {"fp8"}
    assert {quant.split("-")[0] for quant, *_ in RECIPES.values()} >= {"gguf", "mlx"}


def truncating_quantize_weight(original):
    """quantize_weight with integer rounding toward zero: a changed rounding rule."""
    def changed(weight, scale, args):
        if args.type != "int":
            return original(weight, scale, args)
        if args.strategy == "group":
            scale = scale.repeat_interleave(args.group_size, dim=1)
        q_min, q_max = args.value_range
        return (weight / scale).trunc_().clamp_(q_min, q_max).to(torch.int8)
    return changed


def test_a_changed_rounding_rule_fails_until_its_version_is_bumped_and_then_only_its_releases_change(
        golden_repo, golden_builds, tmp_path, monkeypatch):
    table = {case: entry_of(manifest) for case, manifest in golden_builds.items()}  # today's bytes
    case = "golden-tiny-llama-w8a8-int8"
    monkeypatch.setattr(quantize, "quantize_weight", truncating_quantize_weight(quantize.quantize_weight))
    problems = golden_problems(case, build_case(golden_repo, case, tmp_path / "unbumped"), table)
    assert len(problems) == 1 and "without a version bump: model.safetensors differ" in problems[0]
    assert "quantize.int" in problems[0] and "format.compressed-tensors" in problems[0]

    before = {name: lock.lock_entry(golden_repo.root, name)["artifact_id"] for name in CASES}
    monkeypatch.setitem(identity.OUTPUT_VERSIONS, "quantize.int", 2)
    after = {name: lock.lock_entry(golden_repo.root, name)["artifact_id"] for name in CASES}
    assert {name for name in CASES if before[name] != after[name]} == \
        {name for name in CASES if "w8a8" in name or "w4a16" in name or "w4afp8" in name}  # exactly the integer recipes
    problems = golden_problems(case, build_case(golden_repo, case, tmp_path / "bumped"), table)
    assert len(problems) == 1 and "quantize.int 1 -> 2" in problems[0] and "regenerate" in problems[0]
