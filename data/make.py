"""Regenerate data/calibration.txt, data/eval.txt and data/eval-code.txt from texts every Debian machine carries.

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
MAX_DEFINITION_BYTES = 4_000  # one definition per module, short enough that many modules are sampled


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


def code_text() -> str:
    """Source code, a different kind of text than eval.txt's prose: the first top-level function or class
    of each standard-library module (files sorted by name) as written, comments included, that is ASCII,
    at most MAX_DEFINITION_BYTES, and holds no docstring eval.txt could contain; within EVAL_BYTES."""
    found = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            text = "\n".join(lines[first - 1:node.end_lineno]).strip()
            long_doc = any(len(ast.get_docstring(inner) or "") >= MIN_DOCSTRING_CHARS for inner in ast.walk(node)
                           if isinstance(inner, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            if text.isascii() and len(text.encode("utf-8")) <= MAX_DEFINITION_BYTES and not long_doc:
                found.append(text)
                break
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
    (HERE / "eval-code.txt").write_text(code_text(), encoding="utf-8")
