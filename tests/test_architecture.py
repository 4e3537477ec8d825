"""The package's shape (docs/architecture.md): stages import downward only, never in a circle.

    cli, __main__ -> build -> pipeline/ -> check/ -> artifact/ -> quant/ -> source/ -> release/ -> formats/
        -> shared helpers
"""

import ast
from pathlib import Path

from conftest import PROJECT

PACKAGE = PROJECT / "builder"
# Lower number = lower floor. A module may import its own floor and any floor below it.
# formats/ sits just above the shared helpers: resolve (release/) asks a format for its checks, so a
# format imports only shared helpers and is handed the rest (recipe, tensor index, arithmetic).
FLOORS = {"shared": 0, "formats": 1, "release": 2, "source": 3, "quant": 4, "artifact": 5, "check": 6,
          "pipeline": 7, "build": 8, "cli": 9, "__main__": 10}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    """builder.release.lock -> spec's floor; builder.errors (a small shared helper) -> 0."""
    head = module.split(".")[1] if "." in module else "shared"
    return FLOORS.get(head, FLOORS["shared"])


def imports(path: Path) -> set:
    """Every builder module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("builder")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("builder"):
            for alias in node.names:  # `from builder.release import lock` imports builder.release.lock
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PROJECT / Path(*candidate.split("."))).with_suffix(".py").is_file()
                          or (PROJECT / Path(*candidate.split("."))).is_dir() else node.module)
    return found


def graph() -> dict:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_import_goes_down_the_stages_or_stays_on_its_floor():
    upward = [f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
              for module, targets in graph().items() for target in targets if floor(target) > floor(module)]
    assert not upward, "imports that reach up a level:\n" + "\n".join(upward)


def test_no_module_imports_itself_through_others():
    edges = graph()
    cycles = []

    def visit(module, trail):
        for target in sorted(edges.get(module, ())):
            if target in trail:
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in done:
                visit(target, [*trail, target])
        done.add(module)

    done = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_each_stage_is_a_folder_of_modules_of_a_few_hundred_lines_at_most():
    for stage in ("formats", "release", "source", "quant", "artifact", "check", "pipeline"):
        assert (PACKAGE / stage / "__init__.py").is_file()
    too_long = {str(p.relative_to(PROJECT)): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 400}
    assert not too_long, too_long
