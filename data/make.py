"""Regenerate data/calibration.txt and data/eval.txt from texts every Debian machine carries.

    python3 data/make.py    # byte-identical output on Debian 12 with python3.11 (see data/README.md)
"""

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
LICENSES = Path("/usr/share/common-licenses")
STDLIB = Path("/usr/lib/python3.11")
CALIBRATION_BYTES = 200_000
EVAL_BYTES = 100_000
MIN_DOCSTRING_CHARS = 600  # long docstrings are prose; short ones are mostly signatures


def calibration_text() -> str:
    """Whole licence texts (non-symlinked files, sorted by name) while they fit in CALIBRATION_BYTES."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return whole((p.read_text(encoding="utf-8").strip() for p in files), CALIBRATION_BYTES)


def eval_text() -> str:
    """Whole long docstrings of the standard library's top-level modules, in file order, within EVAL_BYTES."""
    found = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS and doc.isascii():
                    found.append(doc.strip())
    return whole(found, EVAL_BYTES)


def whole(texts, limit: int) -> str:
    """Texts joined by blank lines, each kept whole (verbatim), stopping before limit UTF-8 bytes."""
    kept, size = [], 0
    for text in texts:
        size += len(text.encode("utf-8")) + 2
        if size > limit:
            break
        kept.append(text)
    return "\n\n".join(kept) + "\n"


if __name__ == "__main__":
    (HERE / "calibration.txt").write_text(calibration_text(), encoding="utf-8")
    (HERE / "eval.txt").write_text(eval_text(), encoding="utf-8")
