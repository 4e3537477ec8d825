"""Messages and progress for people: lines on stderr; progress bars only on a terminal (quiet in CI)."""

import sys


def log(message: str) -> None:
    """One line for the person running the command (stderr: stdout carries results)."""
    print(message, file=sys.stderr)


def progress(iterable=None, **kwargs):
    """A tqdm bar that shows on a terminal and stays silent in pipes and CI (disable=None)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, **kwargs)
