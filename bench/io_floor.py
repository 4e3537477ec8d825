"""One build against the I/O floor, in the same run and the same page-cache state: how much a build
costs over reading its source once and writing (and hashing) its weights once.

    python bench/io_floor.py [--size 8] [--recipe fp8-dynamic] [--cache warm,cold] [--rounds 1]
        [--baseline DIR] [--work DIR] [--repo DIR] [--keep] [--json rows.json]

Makes a seeded synthetic Llama checkpoint of --size GB (BF16) in a fresh release repository (or reuses
--repo, one a --keep run left), then per round and per cache state runs, each as a process of its own
(wall time, peak RSS: compare.measured): our `builder build`, the I/O floor for as many bytes as the
build's weight files (memory_scale.floor: read the source weight files once, write, sha256 and fsync),
and, with --baseline, the build of another checkout of the builder (e.g. `git worktree add /tmp/base
0bdce51`) on the same repository. Before each process: os.sync (each pays for its own writes), then
the page cache state: `warm` reads the source weight files once (untimed: every process finds them
in memory), `cold` drops their pages (posix_fadvise DONTNEED: every process reads them from disk).
Run from the repository root.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from compare import GNU_TIME, markdown, measured  # noqa: E402
from memory_scale import release_repo, weight_files  # noqa: E402

TARGET = 1.5  # the build's wall time against the floor's, at most
CHUNK = 8 << 20  # bytes read at a time to warm the page cache


def warm(files: list) -> None:
    """Read files once so the next process finds them in the page cache."""
    buffer = memoryview(bytearray(CHUNK))
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def cold(files: list) -> None:
    """Drop files' pages from the page cache (they are clean after os.sync), so the next process reads
    them from disk; other files' pages (other users of the machine) are left alone."""
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def prepared(state: str, files: list) -> None:
    """Flush what earlier processes left dirty, then put the source in the page cache state."""
    os.sync()
    (warm if state == "warm" else cold)(files)


def timed(command: list, env: dict | None = None) -> dict:
    """compare.measured (wall time, peak RSS), and the CPU seconds (user + system) the command took,
    from a GNU time of its own around it: on a shared machine CPU time varies less than wall time."""
    with tempfile.NamedTemporaryFile("r") as cpu:
        result = measured([GNU_TIME, "-q", "-f", "%U %S", "-o", cpu.name, *command], env)
        user, system = (float(value) for value in cpu.read().split()[-2:])
    return {**result, "cpu_seconds": round(user + system, 1)}


def build(checkout: Path, root: Path, release: str) -> dict:
    """`builder build release` of the builder in checkout (python -P: only PYTHONPATH names it)."""
    artifact = root / "artifacts" / release
    shutil.rmtree(artifact, ignore_errors=True)  # (a --keep run's) up-to-date artifact would not be rebuilt
    result = timed([sys.executable, "-P", "-m", "builder", "build", release],
                   env={"BUILDER_ROOT": str(root), "PYTHONPATH": str(checkout)})
    result["output_bytes"] = sum(p.stat().st_size for p in weight_files(artifact))
    result["content_digest"] = json.loads((artifact / "manifest.json").read_text())["content_digest"]
    shutil.rmtree(artifact)
    return result


def floor(source: Path, out: Path, count: int) -> dict:
    result = timed([sys.executable, str(ROOT / "bench" / "memory_scale.py"), "floor", str(source), str(out),
                    str(count)])
    out.unlink()
    return {**result, "output_bytes": count}


def run(args) -> list:
    """The rows of every round and cache state: (tool, cache, round, seconds, peak RSS, ...)."""
    work = Path(tempfile.mkdtemp(prefix="io-floor-", dir=args.work))
    root = args.repo or work / "repo"
    if args.repo is None:
        model, _, writer = release_repo(root, args.size, (args.recipe,), 4, 128)
        print(json.dumps({"tool": "synthetic writer", **writer}), flush=True)
    else:
        model = next((root / "specs" / "release").glob(f"*-{args.recipe}.yaml")).stem[: -len(args.recipe) - 1]
    source, release = root / "weights" / model, f"{model}-{args.recipe}"
    files = weight_files(source)
    base = {"size_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2), "recipe": args.recipe}
    rows, count = [], None
    try:
        for number in range(1, args.rounds + 1):
            for state in args.cache:
                tools = [("ours", lambda: build(ROOT, root, release))]
                tools.append(("I/O floor", lambda: floor(source, work / "floor.bin", count)))
                if args.baseline:
                    tools.append((f"baseline ({args.baseline.name})", lambda: build(args.baseline, root, release)))
                for tool, measure in tools:
                    prepared(state, files)
                    load = os.getloadavg()[0]
                    row = {**base, "tool": tool, "cache": state, "round": number, "load": round(load, 1), **measure()}
                    count = count or row["output_bytes"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        if args.keep:
            print(f"kept: {root}", flush=True)
        else:
            shutil.rmtree(work)
    return rows


def ratio(rows: list, row: dict, key: str) -> str:
    """A build's wall time (or CPU time: key) over the floor's of the same round and cache state."""
    floors = [r for r in rows if r["tool"] == "I/O floor" and (r["round"], r["cache"]) == (row["round"], row["cache"])]
    return f"{row[key] / floors[0][key]:.2f}x" if floors and row["tool"] != "I/O floor" else ""


def table(rows: list) -> str:
    return markdown(rows, (
        ("size (GB BF16)", "---:", lambda r: f"{r['size_gb']:.2f}"), ("recipe", "---", lambda r: r["recipe"]),
        ("page cache", "---", lambda r: r["cache"]), ("round", "---:", lambda r: r["round"]),
        ("tool", "---", lambda r: r["tool"]), ("output (GB)", "---:", lambda r: f"{r['output_bytes'] / 1e9:.2f}"),
        ("wall time (s)", "---:", lambda r: r["seconds"]), ("CPU (s)", "---:", lambda r: r["cpu_seconds"]),
        ("peak RSS (GB)", "---:", lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}"),
        ("load before", "---:", lambda r: r["load"]),
        (f"vs floor (target <= {TARGET}x)", "---:", lambda r: ratio(rows, r, "seconds")),
        ("CPU vs floor", "---:", lambda r: ratio(rows, r, "cpu_seconds"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=8.0, help="GB of BF16 weights")
    parser.add_argument("--recipe", default="fp8-dynamic", help="a shipped quant option")
    parser.add_argument("--cache", default="warm,cold", help="page cache states, comma-separated: warm, cold")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", type=Path, help="another checkout of the builder, built the same way")
    parser.add_argument("--work", type=Path, default=ROOT.parent / "scratch", help="scratch folder")
    parser.add_argument("--repo", type=Path, help="a release repository a --keep run left (skips writing one)")
    parser.add_argument("--keep", action="store_true", help="keep the repository (its path is printed)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.cache = tuple(args.cache.split(","))
    if not set(args.cache) <= {"warm", "cold"}:
        raise SystemExit(f"--cache {','.join(args.cache)}: allowed: warm, cold")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
