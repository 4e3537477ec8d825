"""Errors a user can act on: each names the file, the key, the value and what is allowed."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class BuilderError(Exception):
    """Bad input: exit code 2, nothing written."""

    exit_code = 2

    def __init__(self, problems):
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [str(p) for p in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)


class CheckFailed(BuilderError):
    """A check did not hold (verification mismatch, stale lock, quality gate): exit code 1."""

    exit_code = 1
