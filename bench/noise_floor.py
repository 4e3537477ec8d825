"""Noise floor of a calibrated release's quality: rebuild it with N calibration seeds (which windows of the
calibration text it calibrates on; nothing else changes) and report each eval figure's spread, so a
difference between two recipes can be told apart from the choice of calibration windows.

    python bench/noise_floor.py smollm2-135m-instruct-w4a16-gptq-imatrix [--seeds 0,1,2] [--root .]
        [--override KEY=VALUE ...] [--json FILE]          (from the repository root; one build per seed)
        [--llmc /tmp/venv-llmc/bin/python --llmc-recipe w4a16-gptq-imatrix]

--llmc also runs llm-compressor's oneshot (bench/llmcompressor_side.py RECIPE, in its own venv) on the
windows each seed selects, evaluated on the release's own eval windows with builder.evaluate: its
run-to-run spread on the same seeds, beside ours.

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


def measure_llmc(root: Path, release: str, seeds: list, llmc: str, recipe: str) -> dict:
    """llm-compressor's recipe on the calibration windows each seed selects; {seed: figures} on the release's
    eval windows (the release's source, calibration and eval groups, as our build reads them)."""
    import subprocess

    from safetensors.torch import save_file

    from builder.check import evaluate
    from builder.release.resolve import resolve
    from builder.source import data

    spec = resolve(root, release)
    source = root / spec["model"]["path"]
    eval_ids = data.samples(root, spec["eval"], source, file=f"specs/eval/{spec['choices']['eval']}.yaml", group="eval")
    found = {}
    with tempfile.TemporaryDirectory(prefix="noise-floor-llmc-") as scratch:
        for seed in seeds:
            ids = data.samples(root, {**spec["calibration"], "seed": seed}, source,
                               file=f"specs/calibration/{spec['choices']['calibration']}.yaml", group="calibration")
            ids_file, out = Path(scratch) / f"ids-{seed}.safetensors", Path(scratch) / f"seed-{seed}"
            save_file({"input_ids": ids.contiguous()}, str(ids_file))
            subprocess.run([llmc, str(ROOT / "bench" / "llmcompressor_side.py"), recipe, str(source), str(ids_file),
                            str(out)], check=True, stdout=subprocess.DEVNULL)
            found[seed] = figures(evaluate.measure(source, out, eval_ids))
            print(f"llm-compressor {recipe} seed {seed}: "
                  + ", ".join(f"{name} {value}" for name, value in found[seed].items()), flush=True)
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
    parser.add_argument("--llmc", help="llm-compressor's python: also run its --llmc-recipe on the same seeds")
    parser.add_argument("--llmc-recipe", help="a bench/llmcompressor_side.py recipe name")
    parser.add_argument("--skip-ours", action="store_true", help="only llm-compressor's side (with --llmc)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's builder, whichever is installed
    from builder import determinism

    determinism.apply_environment()  # the CPU math builds pin, before torch loads (else they are refused)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.llmc and not args.llmc_recipe:
        parser.error("--llmc needs --llmc-recipe (a bench/llmcompressor_side.py recipe name)")
    sides = {}
    if not args.skip_ours:
        sides["ours"] = measure(args.root.resolve(), args.release, seeds, args.override)
    if args.llmc:
        sides["llm-compressor"] = measure_llmc(args.root.resolve(), args.release, seeds, args.llmc, args.llmc_recipe)
    spreads = {side: report(found) for side, found in sides.items()}
    print(f"\n| side | figure | mean | min | max | stdev (n={len(seeds)}) |\n|---|---|---:|---:|---:|---:|")
    for side, rows in spreads.items():
        for name, row in rows.items():
            print(f"| {side} | {name} | {row['mean']:.6g} | {row['min']:.6g} | {row['max']:.6g} | {row['stdev']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps({"release": args.release, "overrides": args.override,
                                         "llmc_recipe": args.llmc_recipe, "seeds": sides, "spread": spreads},
                                        indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
