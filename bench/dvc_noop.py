"""Benchmark: no-op `dvc repro` and `builder lock --check` on 20 releases, against a bare DVC floor.

    python bench/dvc_noop.py [--releases 20] [--repeats 5]

Makes two git + DVC repositories in a temporary folder: the product's pipeline (dvc.yaml, builder/,
schemas/, one tiny model, N releases, built once and committed) and a floor of N trivial stages
(`cp` of a small file, one dependency and one output each). Times each command as a subprocess,
interleaved, and prints a Markdown table of medians and their ratio to the floor's no-op repro.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))

from conftest import Pipeline, init_pipeline, release_text  # noqa: E402  (the tests' repository makers)

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


def product_repo(root: Path, count: int) -> Pipeline:
    """The shipped pipeline with `count` tiny releases, built and recorded in dvc.lock."""
    from builder import build
    from builder.spec import lock

    pipeline = init_pipeline(root, ("tiny-llama",), ())
    for index in range(count):
        name = f"tiny-llama-r{index:02d}"
        recipe = ("bf16", "fp8-dynamic")[index % 2]
        text = release_text(name, "tiny-llama", recipe).replace("0.0.1", f"0.0.{index + 1}")
        (root / "specs" / "release" / f"{name}.yaml").write_text(text)
    lock.write(root)
    pipeline.dvc("add", "-q", "weights/tiny-llama")
    for index in range(count):  # built in this process (imports once), then recorded: `dvc commit`
        build.build(root, f"tiny-llama-r{index:02d}", log=lambda message: None)
    pipeline.dvc("commit", "-f", "-q")
    pipeline.commit("releases")
    return pipeline


def floor_repo(root: Path, count: int) -> Pipeline:
    """N trivial stages, already reproduced once."""
    (root / "in").mkdir(parents=True)
    for index in range(count):
        (root / "in" / f"s{index:02d}.txt").write_text(f"{index}\n")
    (root / "params.yaml").write_text("items:\n" + "".join(f"  s{i:02d}: {i}\n" for i in range(count)))
    (root / "dvc.yaml").write_text(FLOOR_DVC_YAML)
    floor = Pipeline(root)
    floor.git("init", "-q", "-b", "main")
    floor.dvc("init", "-q")
    floor.dvc("config", "core.analytics", "false")
    floor.dvc("repro", "-q")
    floor.commit("floor")
    return floor


def timed(repo: Pipeline, *command) -> float:
    start = time.perf_counter()
    result = repo.sh(*command)
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
