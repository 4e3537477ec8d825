"""Benchmark against llm-compressor on the same model, data, sample count and sequence length: per weight
format, our recipes against llm-compressor's defaults and its best opt-in (GPTQ with a searched observer),
wall time and peak RSS of each whole build, perplexity and mean KL on two evaluation texts (all evaluated
by builder.evaluate), and whether our recipes build twice to the same bytes.

    python bench/compare.py [--formats fp8-dynamic,fp8-static,w8a8-int8,w4a16] [--samples 64] [--length 512]
        [--eval-samples 32] [--texts docstrings,code] [--repeat] [--skip llm-compressor:w4a16-gptq-mse,...]
        [--variant 'RECIPE:OVERRIDE OVERRIDE...,...'] [--keep DIR] [--llmc /work/venvs/llmc/bin/python]
        [--json bench/results.json]
        (from the repository root)

--keep DIR keeps every artifact and its measurements in DIR, and a later run reuses what it finds there
(a long comparison can be run a format at a time, or resumed); without it all goes in a temporary folder.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
# format -> (our recipes: shipped releases smollm2-135m-instruct-<recipe>), (llm-compressor's recipes:
# bench/llmcompressor_side.py names). Each side's first recipe is its default for the format (the
# issue's reference for W4A16 is llm-compressor's GPTQ defaults, its second); the last is its best opt-in.
FORMATS = {
    "fp8-dynamic": (("fp8-dynamic", "fp8-dynamic-gptq-imatrix"), ("fp8-dynamic", "fp8-dynamic-gptq-imatrix")),
    "fp8-static": (("fp8-static", "fp8-static-gptq-imatrix"), ("fp8-static", "fp8-static-gptq-mse")),
    "w8a8-int8": (("w8a8-int8", "w8a8-int8-gptq-imatrix", "w8a8-int8-smoothquant",
                   "w8a8-int8-smoothquant-gptq-imatrix"),
                  ("w8a8-int8", "w8a8-int8-smoothquant", "w8a8-int8-gptq-imatrix")),
    "w4a16": (("w4a16", "w4a16-gptq", "w4a16-gptq-imatrix", "w4a16-awq-gptq-imatrix"),
              ("w4a16", "w4a16-gptq", "w4a16-gptq-mse", "w4a16-gptq-imatrix")),
    "nvfp4a16": (("nvfp4a16", "nvfp4a16-gptq-imatrix"), ("nvfp4a16", "nvfp4a16-gptq", "nvfp4a16-gptq-imatrix")),
    "nvfp4": (("nvfp4", "nvfp4-gptq-imatrix"), ("nvfp4", "nvfp4-gptq", "nvfp4-gptq-imatrix")),
}
REFERENCE = {"fp8-dynamic": "fp8-dynamic", "fp8-static": "fp8-static", "w8a8-int8": "w8a8-int8",
             "w4a16": "w4a16-gptq", "nvfp4a16": "nvfp4a16", "nvfp4": "nvfp4"}  # llm-compressor's default the targets are measured against
CALIBRATED = ("fp8-static", "w4a16-gptq")  # llm-compressor recipes that read calibration data (memory_scale)
TARGET_KL_CUT = {"fp8-dynamic": 10, "fp8-static": 10, "w8a8-int8": 10, "w4a16": 30, "nvfp4a16": 10, "nvfp4": 10}  # % lower mean KL
# Evaluation texts: the shipped eval option, and a second text of another kind (data/README.md).
TEXTS = {"docstrings": "data/eval.txt", "code": "data/eval-code.txt"}
GNU_TIME = "/usr/bin/time"


def measured(command: list, env: dict | None = None) -> dict:
    """Run a command; its wall time (s), CPU time (user + system s: what varies less on a shared machine)
    and the peak RSS (bytes) of its process, as GNU time reports them.

    Not wait4 on our own child: Linux carries the parent's high-water RSS into a forked child's ru_maxrss
    (exec records the copied address space's peak), so a child of this process, which holds two FP32
    models after an evaluation, would report at least this process's peak. GNU time is a small process:
    its child's figure is its own.
    """
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} not found: install GNU time (Debian: apt install time)")
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()  # a file, not a pipe, for the log: a chatty child never blocks on it
        status = subprocess.run([GNU_TIME, "-q", "-f", "%U %S %M", "-o", peak.name, *command], cwd=ROOT,
                                env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log).returncode
        seconds = time.perf_counter() - start
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read().decode(errors='replace')[-3000:]}")
        user, system, kilobytes = peak.read().split()[-3:]
    return {"seconds": round(seconds, 1), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_bytes": int(kilobytes) * 1024}


def calibrates(recipe: str) -> bool:
    """Whether our release for recipe reads calibration data (then its sample count and length are set)."""
    from builder.release.resolve import resolve

    return resolve(ROOT, f"{MODEL}-{recipe}")["calibration"]["dataset"] is not None


def ours(recipe: str, out: Path, samples: int, length: int, extra: tuple = ()) -> dict:
    overrides = ["eval=none", *extra]  # evaluated below, like theirs, outside the timed run
    if calibrates(recipe):
        overrides += [f"calibration.samples={samples}", f"calibration.sequence_length={length}"]
    result = measured([sys.executable, "-m", "builder", "build", f"{MODEL}-{recipe}", *overrides,
                       "--out", str(out), "--force"])
    manifest = json.loads((out / "manifest.json").read_text())
    return {**result, "content_digest": manifest["content_digest"]}


def theirs(llmc: str, recipe: str, ids_file: Path, out: Path, source: Path = ROOT / "weights" / MODEL,
           group_size: int = 64) -> dict:
    """llm-compressor's oneshot of recipe on source, in its own venv, measured whole."""
    return measured([llmc, str(ROOT / "bench" / "llmcompressor_side.py"), recipe, str(source), str(ids_file), str(out),
                     str(group_size)])


def windows(group: str, option: str, samples: int, length: int, dataset: str | None = None):
    """The token windows builder.data selects for a shipped calibration/eval option, resized (and
    drawn from another file of data/ when dataset is given)."""
    import yaml

    from builder.source import data

    spec = {**yaml.safe_load((ROOT / "specs" / group / f"{option}.yaml").read_text()),
            "samples": samples, "sequence_length": length}
    if dataset is not None:
        spec["dataset"] = dataset
    return data.samples(ROOT, spec, ROOT / "weights" / MODEL, file=f"specs/{group}/{option}.yaml", group=group)


def kept(out: Path, run) -> dict:
    """run(out)'s measurements, recorded beside out; those recorded by an earlier run when out is there."""
    record = out.with_name(out.name + ".json")
    if record.is_file() and out.is_dir():
        return json.loads(record.read_text())
    result = run(out)
    record.write_text(json.dumps(result, sort_keys=True) + "\n")
    return result


def run_format(name: str, args, ids_file: Path, eval_ids: dict, scratch: Path) -> list:
    """Build every recipe of a format on both sides, then evaluate them together on each text."""
    from builder.check import evaluate

    rows, outs = [], []
    recipes_ours, recipes_theirs = FORMATS[name]
    variants = [tuple(item.split(":", 1)) for item in args.variant.split(",") if item]  # (recipe, override)
    recipes_ours = (*recipes_ours, *(f"{recipe}:{override}" for recipe, override in variants if recipe in recipes_ours))
    for side, recipes in (("ours", recipes_ours), ("llm-compressor", recipes_theirs)):
        for recipe in recipes:
            if f"{side}:{recipe}" in args.skip.split(","):
                continue
            base, _, override = recipe.partition(":")
            label = "_".join(item.strip("+").replace("=", "-") for item in override.split())
            out = scratch / f"{side}-{base}{'-' + label if override else ''}"
            row = {"format": name, "side": side, "recipe": recipe}
            if side == "ours":
                extra = tuple(override.split())
                row.update(kept(out, lambda out: ours(base, out, args.samples, args.length, extra)))
                if args.repeat and recipe != recipes[0] and f"again:{recipe}" not in args.skip.split(","):
                    again = kept(scratch / f"again-{out.name.removeprefix('ours-')}",
                                 lambda out: ours(base, out, args.samples, args.length, extra))
                    row["repeat_seconds"], row["repeat_digest"] = again["seconds"], again["content_digest"]
                    row["repeatable"] = again["content_digest"] == row["content_digest"]
            else:
                row.update(kept(out, lambda out: theirs(args.llmc, recipe, ids_file, out)))
            print(json.dumps(row), flush=True)
            rows.append(row)
            outs.append(out)
    for text, ids in eval_ids.items():
        records = [out.with_name(f"{out.name}.{text}-{ids.shape[0]}x{ids.shape[1]}.json") for out in outs]
        todo = [index for index, record in enumerate(records) if not record.is_file()]  # --keep: measured before
        for index, quality in zip(todo, evaluate.measure_all(ROOT / "weights" / MODEL, [outs[i] for i in todo], ids)
                                  if todo else ()):
            records[index].write_text(json.dumps(quality, sort_keys=True) + "\n")
        for row, record in zip(rows, records):
            quality = json.loads(record.read_text())
            row[text] = {"perplexity": quality["perplexity"]["artifact"],
                         "source_perplexity": quality["perplexity"]["source"],
                         "perplexity_increase_pct": quality["perplexity_increase_pct"], "mean_kl": quality["mean_kl"]}
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32, help="0: time the builds only")
    parser.add_argument("--texts", default=",".join(TEXTS),
                        help=f"evaluation texts, of {', '.join(TEXTS)}; TEXT:N evaluates N windows of it")
    parser.add_argument("--repeat", action="store_true", help="build each of our non-default recipes twice")
    parser.add_argument("--skip", default="", help="side:recipe pairs not to run, e.g. llm-compressor:w4a16-gptq-mse (again:RECIPE: no repeat build)")
    parser.add_argument("--variant", default="", help="our recipes built again with overrides (separated by spaces), "
                        "as rows of their own, e.g. nvfp4a16-gptq-imatrix:+quant.gptq.asymmetric=true")
    parser.add_argument("--keep", type=Path, help="keep artifacts and measurements here, and reuse them")
    parser.add_argument("--llmc", default="/work/venvs/llmc/bin/python")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    from builder import determinism

    determinism.apply_environment()
    determinism.apply_torch()
    rows = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as temporary:
        scratch = args.keep.resolve() if args.keep else Path(temporary)
        ids_file = scratch / "calibration.safetensors"
        save_file({"input_ids": windows("calibration", "licenses", args.samples, args.length).contiguous()},
                  ids_file)
        chosen = [(text.partition(":")[0], int(text.partition(":")[2] or args.eval_samples))
                  for text in args.texts.split(",")]
        eval_ids = {text: windows("eval", "docstrings", count, args.length, TEXTS[text])
                    for text, count in chosen} if args.eval_samples else {}
        for name in args.formats.split(","):
            rows += run_format(name, args, ids_file, eval_ids, scratch)
            if args.json:  # after each format: a long run keeps what it measured
                args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    print(table(rows, list(eval_ids)))
    if eval_ids:
        print(targets(rows, list(eval_ids)))


def table(rows: list, texts: list) -> str:
    """Markdown: one line per format, side and recipe (quality columns per evaluation text)."""
    columns = [("format", "---", lambda r: r["format"]), ("tool", "---", lambda r: r["side"]),
               ("recipe", "---", lambda r: r["recipe"]), ("wall time (s)", "---:", lambda r: r["seconds"]),
               ("peak RSS (GB)", "---:", lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}")]
    for text in texts:
        columns += [(f"{text}: ppl", "---:", lambda r, t=text: f"{r[t]['perplexity']:.3f}"),
                    (f"{text}: increase", "---:", lambda r, t=text: f"{r[t]['perplexity_increase_pct']:+.2f} %"),
                    (f"{text}: mean KL", "---:", lambda r, t=text: f"{r[t]['mean_kl']:.4f}")]
    columns.append(("same bytes twice", "---", lambda r: {True: "yes", False: "**no**"}.get(r.get("repeatable"), "")))
    return markdown(rows, tuple(columns))


def targets(rows: list, texts: list) -> str:
    """Markdown: per format and text, our best recipe's KL against llm-compressor's default (the issue's
    target cut) and against its best opt-in, and the perplexity increases."""
    lines = []
    for name in dict.fromkeys(r["format"] for r in rows):
        mine = [r for r in rows if r["format"] == name and r["side"] == "ours"]
        other = [r for r in rows if r["format"] == name and r["side"] != "ours"]
        reference = next((r for r in other if r["recipe"] == REFERENCE[name]), None)
        opt_ins = [r for r in other if r["recipe"] in FORMATS[name][1][1:] and r["recipe"] != REFERENCE[name]]
        if not mine or reference is None:
            continue  # skipped: nothing to compare
        best = mine[-1]
        opt_in = min(opt_ins, key=lambda r: r[texts[0]]["mean_kl"]) if opt_ins else \
            {"recipe": "not run", **{text: {"mean_kl": float("nan"), "perplexity_increase_pct": float("nan")}
                                     for text in texts}}
        for text in texts:
            cut = 100 * (1 - best[text]["mean_kl"] / reference[text]["mean_kl"])
            lines.append({"format": name, "text": text, "ours": best["recipe"], "kl": best[text]["mean_kl"],
                          "reference": reference[text]["mean_kl"], "cut": cut, "target": TARGET_KL_CUT[name],
                          "ppl": best[text]["perplexity_increase_pct"],
                          "reference_ppl": reference[text]["perplexity_increase_pct"], "opt_in": opt_in["recipe"],
                          "opt_in_kl": opt_in[text]["mean_kl"], "opt_in_ppl": opt_in[text]["perplexity_increase_pct"]})
    columns = (("format", "---", lambda r: r["format"]), ("text", "---", lambda r: r["text"]),
               ("ours (best)", "---", lambda r: r["ours"]), ("mean KL", "---:", lambda r: f"{r['kl']:.4f}"),
               ("their default", "---:", lambda r: f"{r['reference']:.4f}"),
               ("KL cut", "---:", lambda r: f"{r['cut']:.1f} % (target {r['target']} %)"),
               ("ppl increase: ours / default", "---:", lambda r: f"{r['ppl']:+.2f} / {r['reference_ppl']:+.2f} %"),
               ("their best opt-in", "---", lambda r: r["opt_in"]),
               ("its KL / ppl increase", "---:", lambda r: f"{r['opt_in_kl']:.4f} / {r['opt_in_ppl']:+.2f} %"))
    return markdown(lines, columns)


def markdown(rows: list, columns: tuple) -> str:
    """A Markdown table of rows; columns are (header, alignment such as "---:", cell function)."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join(align for _, align, _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell(row)) for _, _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
