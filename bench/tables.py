"""Render BENCHMARKS.md's tables that have bench JSON behind them, in place.

    python bench/tables.py           # rewrite each `<!-- bench table: NAME -->` block from its JSON
    python bench/tables.py --check   # exit 1 if a block differs from its JSON (tests/test_docs.py runs it)

A block sits between `<!-- bench table: NAME -->` and `<!-- end bench table -->`; TABLES maps NAME to the
JSON file (written by the benchmark's --json) and the function that renders its rows.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

BENCHMARKS = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- bench table: ([a-z-]+) -->\n)(.*?)(<!-- end bench table -->)", flags=re.S)


def scale(rows: list) -> str:
    """bench/memory_scale.py's own table of its --json rows."""
    import memory_scale

    return memory_scale.table(rows)


# name -> (JSON file under the repository, renderer of its rows)
TABLES = {"scale": ("docs/scale.json", scale)}


def render(name: str) -> str:
    path, renderer = TABLES[name]
    return renderer(json.loads((ROOT / path).read_text())).rstrip("\n") + "\n"


def stale(text: str) -> list:
    """Names of the blocks in text that differ from their JSON's rendering."""
    return [m.group(2) for m in BLOCK.finditer(text) if m.group(3) != render(m.group(2))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from its JSON")
    args = parser.parse_args()
    text = BENCHMARKS.read_text()
    if args.check:
        names = stale(text)
        print(f"stale: {', '.join(names)} (run python bench/tables.py)" if names else "tables are current")
        return 1 if names else 0
    BENCHMARKS.write_text(BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
