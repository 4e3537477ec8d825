"""Noise floor of a calibrated release's quality: rebuild it with N calibration seeds (which windows of the
calibration text it calibrates on; nothing else changes) and report each eval figure's spread, so a
difference between two recipes can be told apart from the choice of calibration windows.

    python bench/noise_floor.py smollm2-135m-instruct-w4a16-gptq-imatrix [--seeds 0,1,2] [--root .]
        [--override KEY=VALUE ...] [--json FILE]          (from the repository root; one build per seed)

Each build goes to a temporary folder (the release's artifacts/ folder is untouched) and must have an eval
group. Printed: one row per seed, then mean, min, max and sample standard deviation of perplexity increase,
mean KL and, where the release names tasks, each task's recovery.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def figures(evaluation: dict) -> dict:
    """The figures of one eval.json that the spread is taken over."""
    found = {"perplexity_increase_pct": evaluation["perplexity_increase_pct"], "mean_kl": evaluation["mean_kl"]}
    for row in (evaluation.get("tasks") or {}).get("results", []):
        found[f"{row['task']} {row['metric']} recovery"] = row["recovery"]
    return found


def spread(values: list) -> dict:
    """mean, min, max and sample standard deviation (0 for one value) of the defined values."""
    defined = [value for value in values if value is not None]
    return {"mean": statistics.fmean(defined), "min": min(defined), "max": max(defined),
            "stdev": statistics.stdev(defined) if len(defined) > 1 else 0.0}


def measure(root: Path, release: str, seeds: list, overrides: list) -> dict:
    """Build release once per calibration seed into a temporary folder; {seed: figures}."""
    from builder.build import build

    found = {}
    with tempfile.TemporaryDirectory(prefix="noise-floor-") as scratch:
        for seed in seeds:
            out = Path(scratch) / f"seed-{seed}"
            build(root, release, (*overrides, f"calibration.seed={seed}"), out=out, log=lambda message: None)
            evaluation = out / "eval.json"
            if not evaluation.is_file():
                sys.exit(f"{release}: no eval.json (the release has no eval group; pass --override eval=docstrings)")
            found[seed] = figures(json.loads(evaluation.read_text(encoding="utf-8")))
            print(f"seed {seed}: " + ", ".join(f"{name} {value}" for name, value in found[seed].items()), flush=True)
    return found


def report(found: dict) -> dict:
    """figure -> its spread over the seeds."""
    names = list(next(iter(found.values())))
    return {name: spread([found[seed][name] for seed in found]) for name in names}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma-separated")
    parser.add_argument("--root", type=Path, default=ROOT, help="the release repository")
    parser.add_argument("--override", action="append", default=[], help="Hydra override, repeatable")
    parser.add_argument("--json", type=Path, help="also write the per-seed figures and spreads here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's builder, whichever is installed
    seeds = [int(seed) for seed in args.seeds.split(",")]
    found = measure(args.root.resolve(), args.release, seeds, args.override)
    spreads = report(found)
    print(f"\n| figure | mean | min | max | stdev (n={len(seeds)}) |\n|---|---:|---:|---:|---:|")
    for name, row in spreads.items():
        print(f"| {name} | {row['mean']:.6g} | {row['min']:.6g} | {row['max']:.6g} | {row['stdev']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps({"release": args.release, "overrides": args.override, "seeds": found,
                                         "spread": spreads}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
