"""The builder package's shape in figures: modules per folder, the longest import chain, and how many
modules name each output format in their code (what adding or changing a format touches).

    python bench/structure.py [--repo DIR] [--json]      (DIR: a checkout, default this one)
"""

import argparse
import ast
import io
import json
import re
import tokenize
from functools import cache
from pathlib import Path

# Words that name an output format in code (format names, their loaders' and writers' vocabulary).
FORMAT_WORDS = {"gguf": r"gguf", "mlx": r"\bmlx", "fp8 (legacy layout)": r"[\"']fp8[\"']",
                "compressed-tensors": r"compressed[-_]tensors"}


def modules(package: Path) -> dict:
    """Dotted module name -> path, for every .py file of the package."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict) -> set:
    """The package's modules that a file imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "builder":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found & set(known)


def code_only(text: str) -> str:
    """The source without comments and docstrings: what a module does, not what it mentions."""
    docstrings = {(node.lineno, node.col_offset) for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str)}
    kept = [token.string for token in tokenize.generate_tokens(io.StringIO(text).readline)
            if token.type != tokenize.COMMENT and not (token.type == tokenize.STRING and token.start in docstrings)]
    return " ".join(kept)


def longest_chain(edges: dict) -> list:
    """The longest path of imports (edges are acyclic in this package; a cycle is cut where it closes)."""
    @cache
    def longest(module: str, trail: frozenset) -> tuple:
        best = (module,)
        for target in sorted(edges.get(module, ())):
            if target not in trail and target != module:
                candidate = (module, *longest(target, trail | {module}))
                best = max(best, candidate, key=len)
        return best

    return list(max((longest(m, frozenset()) for m in sorted(edges)), key=len))


def measure(repo: Path) -> dict:
    package = repo / "builder"
    known = modules(package)
    per_folder = {}
    for name in known:
        folder = name.split(".")[1] if name.count(".") >= 2 else "(top level)"
        per_folder[folder] = per_folder.get(folder, 0) + 1
    edges = {name: imports(path, known) - {name} for name, path in known.items()}
    texts = {name: path.read_text(encoding="utf-8") for name, path in known.items()}
    code = {name: code_only(text).lower() for name, text in texts.items()}
    mentions = {word: sorted(n for n, t in code.items() if re.search(pattern, t))
                for word, pattern in FORMAT_WORDS.items()}
    chain = longest_chain(edges)
    return {"modules": len(known), "lines": sum(t.count("\n") for t in texts.values()),
            "modules_per_folder": dict(sorted(per_folder.items())), "longest_import_chain": chain,
            "longest_import_chain_length": len(chain),
            "modules_naming_format": {w: len(m) for w, m in mentions.items()}, "naming": mentions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.repo)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    print(f"{result['modules']} modules, {result['lines']} lines")
    print("modules per folder: " + ", ".join(f"{k} {v}" for k, v in result["modules_per_folder"].items()))
    print(f"longest import chain ({result['longest_import_chain_length']}): "
          + " -> ".join(result["longest_import_chain"]))
    print("modules whose code (not comments or docstrings) names a format: " + ", ".join(f"{k} {v}" for k, v in result["modules_naming_format"].items()))


if __name__ == "__main__":
    main()
