"""The GPU proof kit: calibrated builds on one device, twice each, beside llm-compressor's GPTQ; one table.

    python bench/gpu/kit.py [--device cuda|cpu] [--llmc PYTHON] [--work DIR] [--budget 420]
                            [--samples N --length T] [--models a,b] [--recipes r,s] [--json rows.json] [--logs DIR]

(bench/gpu/run.sh runs it on a GPU machine, in a venv made from the carried wheels; --device cpu is the
dry run the test suite makes.) Steps, each a subprocess (the driver itself never imports torch):
1. bench/gpu/models.py makes a release repository with seeded synthetic checkpoints (an 8B Llama's
   decoder layer shape with few layers, and a small Llama; smaller shapes on the CPU).
2. For each model and recipe (w4a16-gptq, fp8-static): `builder build` twice with
   `calibration.device=DEVICE`, into two folders; the two content digests are compared.
3. With --llmc (a python that imports llmcompressor): llm-compressor's oneshot GPTQ (W4A16, group 128,
   its defaults otherwise) on the same checkpoint and the same token windows, on the same device (its
   sequential pipeline onloads each layer to the GPU when there is one); twice, its weights compared.
4. One Markdown table: seconds per decoder layer (the layer-by-layer work / layers), whole runs, peak
   GPU memory (torch.cuda.max_memory_allocated), peak RSS, identical twice.
Runs are ordered by what matters most (the 8B-shaped GPTQ first, llm-compressor's second run last);
a run that would start past --budget seconds is skipped and the table says so, so that the whole kit
ends within the time a GPU is lent. Exit 0 when every run that ran succeeded and every pair matched.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from table import markdown  # noqa: E402

# Calibration windows per device: the shipped licenses option's 64 x 512 on a GPU; 4 x 64 on two cores.
WINDOWS = {"cuda": (64, 512), "cpu": (4, 64)}
# Seconds after which no run starts: the GPU is lent for minutes (the device tool stops a command at 600 s).
BUDGET = {"cuda": 420, "cpu": 3600}
LLMC_RECIPE = "w4a16-gptq"  # bench/llmcompressor_side.py's name for its GPTQ defaults
GROUP_SIZE = 128             # specs/quant/w4a16-gptq.yaml's


def plan(models: dict, recipes: list, llmc: bool) -> list:
    """The runs in the order they are worth GPU time: (model, recipe, tool, attempt)."""
    runs, again = [], []
    for model in models:
        for recipe in recipes:
            runs += [(model, recipe, "builder", 1), (model, recipe, "builder", 2)]
            if llmc and recipe == LLMC_RECIPE:
                runs.append((model, recipe, "llm-compressor", 1))
                again.append((model, recipe, "llm-compressor", 2))
    return runs + again


def command(run: tuple, args, repo: Path, out: Path, record: Path, ids: Path | None) -> list:
    """The measured subprocess of one run."""
    model, recipe, tool, _ = run
    samples, length = args.samples, args.length
    if tool == "builder":
        return [sys.executable, str(HERE / "measure.py"), str(record), "builder", "build", f"{model}-{recipe}",
                f"calibration.device={args.device}", f"calibration.samples={samples}",
                f"calibration.sequence_length={length}", "--out", str(out), "--force"]
    return [args.llmc, str(HERE / "measure.py"), str(record), "llmc", LLMC_RECIPE, str(repo / "weights" / model),
            str(ids), str(out), str(GROUP_SIZE)]


def execute(run: tuple, args, repo: Path, work: Path, deadline: float) -> dict:
    """One run as a subprocess within the time left; its measure.py record (or why there is none)."""
    model, recipe, tool, attempt = run
    name = f"{model}-{recipe}-{tool}-{attempt}"
    left = deadline - time.monotonic()
    if left <= 0:
        return {"skipped": f"past the {args.budget:g} s budget"}
    ids = None
    if tool == "llm-compressor":
        ids = work / f"{model}-windows.safetensors"
        made = ids.is_file() or subprocess.run(
            [sys.executable, str(HERE / "models.py"), "windows", str(repo), model, str(args.samples), str(args.length),
             str(ids)], capture_output=True, text=True)
        if made is not True and made.returncode:
            return {"code": made.returncode, "error": f"token windows: {made.stderr.strip()[-200:]}"}
    out, record = work / "out" / name, work / "records" / f"{name}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "BUILDER_ROOT": str(repo), "BUILDER_CACHE": "off", "PYTHONPATH": python_path()}
    with open(work / "logs" / f"{name}.log", "w") as log:
        try:
            subprocess.run(command(run, args, repo, out, record, ids), cwd=repo, env=environment, stdout=log,
                           stderr=subprocess.STDOUT, timeout=left)
        except subprocess.TimeoutExpired:
            return {"skipped": f"stopped at the {args.budget:g} s budget"}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if not record.is_file():
        return {"code": -1, "error": f"no record (see {log.name})"}
    return json.loads(record.read_text())


def python_path() -> str:
    """PYTHONPATH for the runs: this checkout's builder/ first, then whatever was there."""
    return os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(WINDOWS), default="cuda")
    parser.add_argument("--llmc", default="", help="python of a venv with llmcompressor ('' skips its runs)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the built artifacts under --work/out")
    parser.add_argument("--budget", type=float, help="no run starts after this many seconds (default: by device)")
    parser.add_argument("--samples", type=int, help="calibration windows (default: by device)")
    parser.add_argument("--length", type=int, help="tokens per window (default: by device)")
    parser.add_argument("--models", help="comma-separated subset of bench/gpu/models.py's SHAPES")
    parser.add_argument("--recipes", default="w4a16-gptq,fp8-static")
    parser.add_argument("--json", type=Path, help="write every run's record here")
    parser.add_argument("--logs", type=Path, help="copy every run's log into this folder")
    args = parser.parse_args(argv)
    args.samples = args.samples or WINDOWS[args.device][0]
    args.length = args.length or WINDOWS[args.device][1]
    args.budget = args.budget or BUDGET[args.device]
    deadline = time.monotonic() + args.budget
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    made = subprocess.run([sys.executable, str(HERE / "models.py"), "repo", str(work / "repo"), "--device", args.device],
                          capture_output=True, text=True)
    if made.returncode:
        print(made.stderr[-3000:], file=sys.stderr)
        return 1
    models = json.loads(made.stdout.splitlines()[-1])
    if args.models:
        models = {name: models[name] for name in args.models.split(",")}
    shapes = ", ".join(f"{name}: {model['layers']} layers, {model['params'] / 1e6:,.1f} M parameters"
                       for name, model in models.items())
    print(f"checkpoints and release repository: {time.perf_counter() - start:.1f} s ({shapes})", flush=True)
    results = {}
    for run in plan(models, args.recipes.split(","), bool(args.llmc)):
        results[run] = execute(run, args, work / "repo", work, deadline)
        outcome = results[run].get("skipped") or results[run].get("error") or f"{results[run]['seconds']:.1f} s"
        print(f"{' '.join(map(str, run))}: {outcome}", flush=True)
    rows = [{**result, "model": model, "recipe": recipe, "tool": tool, "attempt": attempt,
             "layers": models[model]["layers"]} for (model, recipe, tool, attempt), result in results.items()]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    print(f"\ndevice: {args.device} ({device_name(args.device)}); calibration {args.samples} x {args.length} "
          f"tokens; kit wall time {time.perf_counter() - start:.0f} s\n")
    table, ok = markdown(rows, models)
    print(table)
    if args.logs:
        shutil.copytree(work / "logs", args.logs, dirs_exist_ok=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def device_name(device: str) -> str:
    """The GPU's name (asked of torch in a subprocess, so that this process never starts CUDA)."""
    if device != "cuda":
        return "CPU dry run"
    found = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "no CUDA device"


if __name__ == "__main__":
    sys.exit(main())
