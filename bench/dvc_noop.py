"""Benchmark: no-op `dvc repro` and `builder lock --check` on 20 releases, against a bare DVC floor.

    python bench/dvc_noop.py [--releases 20] [--repeats 5]

Makes two git + DVC repositories in a temporary folder: the product's pipeline (dvc.yaml, builder/,
schemas/, one tiny model, N releases, built once and committed) and a floor of N trivial stages
(`cp` of a small file, one dependency and one output each). Times each command as a subprocess,
interleaved, and prints a Markdown table of medians and their ratio to the floor's no-op repro.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PIPELINE_FILES = (".dvcignore", ".gitignore", "dvc.yaml")
ENVIRONMENT = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BUILDER_ROOT")} | {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid", "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid", "DVC_NO_ANALYTICS": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

FLOOR_DVC_YAML = """\
stages:
  copy:
    foreach: ${items}
    do:
      cmd: mkdir -p out && cp in/${key}.txt out/${key}.txt
      deps:
        - in/${key}.txt
      outs:
        - out/${key}.txt
"""


def run(root: Path, *command) -> subprocess.CompletedProcess:
    """A command in the repository, as a user runs it there (its own copy of builder/ first)."""
    result = subprocess.run(command, cwd=root, env=ENVIRONMENT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{command}: {result.stdout}\n{result.stderr}")
    return result


def tiny_checkpoint(folder: Path) -> None:
    """A seeded random Llama of a few hundred kB, with SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=2048)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PROJECT / "weights" / "smollm2-135m-instruct" / name, folder / name)


def product_repo(root: Path, count: int) -> Path:
    """The shipped pipeline with `count` tiny releases, built and recorded in dvc.lock, made with the
    product's own commands (`builder model add`, `builder lock`, `builder build`, `dvc commit`)."""
    for name in ("specs", "data", "builder", "schemas"):
        shutil.copytree(PROJECT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PIPELINE_FILES:
        shutil.copy(PROJECT / name, root / name)
    for shipped in (root / "specs" / "release").glob("*.yaml"):
        shipped.unlink()
    run(root, "git", "init", "-q", "-b", "main")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    tiny_checkpoint(root.parent / "download" / "tiny-llama")
    run(root, sys.executable, "-m", "builder", "model", "add", "tiny-llama", str(root.parent / "download" / "tiny-llama"))
    for index in range(count):
        name = f"tiny-llama-r{index:02d}"
        recipe = ("bf16", "fp8-dynamic")[index % 2]
        (root / "specs" / "release" / f"{name}.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - override /model: tiny-llama\n  - override /quant: {recipe}\n"
            f"\nrelease:\n  name: {name}\n  version: 0.0.{index + 1}\n")
    run(root, sys.executable, "-m", "builder", "lock")
    run(root, sys.executable, "-m", "dvc", "add", "-q", "weights/tiny-llama")
    for index in range(count):
        run(root, sys.executable, "-m", "builder", "build", f"tiny-llama-r{index:02d}")
    run(root, sys.executable, "-m", "dvc", "commit", "-f", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "releases")
    return root


def floor_repo(root: Path, count: int) -> Path:
    """N trivial stages, already reproduced once."""
    (root / "in").mkdir(parents=True)
    for index in range(count):
        (root / "in" / f"s{index:02d}.txt").write_text(f"{index}\n")
    (root / "params.yaml").write_text("items:\n" + "".join(f"  s{i:02d}: {i}\n" for i in range(count)))
    (root / "dvc.yaml").write_text(FLOOR_DVC_YAML)
    run(root, "git", "init", "-q", "-b", "main")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "repro", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "floor")
    return root


def timed(repo: Path, *command) -> float:
    start = time.perf_counter()
    result = run(repo, *command)
    elapsed = time.perf_counter() - start
    assert "Running stage" not in result.stdout, f"{command} was not a no-op:\n{result.stdout}"
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dvc-") as temporary:
        product = product_repo(Path(temporary) / "product", args.releases)
        floor = floor_repo(Path(temporary) / "floor", args.releases)
        commands = {
            f"floor: `dvc repro`, {args.releases} trivial stages, no-op": (floor, sys.executable, "-m", "dvc", "repro"),
            f"`dvc repro`, {args.releases} releases, no-op": (product, sys.executable, "-m", "dvc", "repro"),
            f"`builder lock --check`, {args.releases} releases": (product, sys.executable, "-m", "builder",
                                                                   "lock", "--check"),
        }
        for repo, *command in commands.values():  # warm file caches and DVC's state database
            timed(repo, *command)
        samples = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (repo, *command) in commands.items():
                samples[name].append(timed(repo, *command))
    floor_median = statistics.median(next(iter(samples.values())))
    print("| command | median s | min s | × floor |\n|---|---|---|---|")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {min(values):.2f} | {median / floor_median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
