"""Messages and progress for people: lines on stderr; progress bars only on a terminal (quiet in CI)."""

import os
import sys
from pathlib import Path


def log(message: str) -> None:
    """One line for the person running the command (stderr: stdout carries results)."""
    print(message, file=sys.stderr)


def progress(iterable=None, **kwargs):
    """A tqdm bar that shows on a terminal and stays silent in pipes and CI (disable=None)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, **kwargs)


BARS_OFF = ("TQDM_DISABLE", "1")  # tqdm's default for disable, read from the environment when it is imported


def quiet_library_bars() -> None:
    """Off a terminal, keep the bars the libraries we call draw (compressed-tensors' per-module
    compression, transformers' shard writing, lm-eval's requests) out of logs: tqdm reads TQDM_DISABLE
    when it is first imported, so call this before anything imports it. Our own bars pass disable=None
    and still follow the terminal; a TQDM_DISABLE the person set is left as it is."""
    if not sys.stderr.isatty():
        os.environ.setdefault(*BARS_OFF)


def crash_report(argv: list) -> str:
    """The traceback of the exception being handled, with the command line, in a new file under the
    system's temporary folder; returns its path (the user sees one line, a report gets the whole story)."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="builder-crash-", suffix=".txt", delete=False) as handle:
        handle.write(f"builder {' '.join(argv)}\n\n{traceback.format_exc()}")
    return handle.name


def table(rows: list, columns: tuple) -> str:
    """rows (dicts) as left-aligned text columns under a header; the last column is not padded."""
    lines = [dict(zip(columns, columns)), *rows]
    widths = [max(len(str(line[c])) for line in lines) for c in columns[:-1]]
    return "".join("  ".join([*(str(line[c]).ljust(w) for c, w in zip(columns, widths)), str(line[columns[-1]])])
                   .rstrip() + "\n" for line in lines)


def shown_path(path: Path) -> str:
    """A path as the person can type it from here: relative when it is below the working directory."""
    absolute = Path(path).absolute()
    return absolute.relative_to(Path.cwd()).as_posix() if absolute.is_relative_to(Path.cwd()) else str(absolute)


def built(result: dict, serve_command: str | None) -> str:
    """What a build made and what to run next (the same whether it built or found it up to date)."""
    path = result["path"]
    lines = [f"artifact:       {path}", f"release:        {result['release']}",
             f"artifact_id:    {result['artifact_id']}", f"content digest: {result['content_digest']}",
             "next:", f"  builder verify {path}", f"  builder eval {path}"]
    if serve_command:
        lines.append(f"  {serve_command}")
    return "\n".join(lines)


def missing_package(verb: str, error: ModuleNotFoundError) -> str:
    """The one line for a Python that lacks a package the builder imports (run outside its environment)."""
    return (f"{' '.join(('builder', verb)).strip()}: error: this Python ({sys.executable}) cannot import "
            f"{error.name!r}, which the builder needs; run it in the environment the README's install command made "
            "(pip install -e .)")
