"""The command line: one function per verb, documented, with the promised exit codes."""

import re
import subprocess
import sys

import pytest

from builder.cli import VERBS
from conftest import PROJECT


def test_the_readme_command_table_lists_exactly_the_verbs_the_cli_has():
    rows = re.findall(r"^\| `builder ([a-z-]+)", (PROJECT / "README.md").read_text(), flags=re.M)
    assert set(rows) == set(VERBS), "README's command table and builder/cli.py's VERBS disagree"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_explains_itself_with_help(verb):
    result = subprocess.run([sys.executable, "-m", "builder", verb, "--help"], cwd=PROJECT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and VERBS[verb][1] in " ".join(result.stdout.split())


def test_python_dash_m_builder_lists_the_shipped_releases():
    result = subprocess.run([sys.executable, "-m", "builder", "list"], cwd=PROJECT / "specs",
                            capture_output=True, text=True, check=True)
    assert "smollm2-135m-instruct-fp8-dynamic" in result.stdout.split()


def test_outside_a_repository_the_error_says_where_to_go(tmp_path):
    result = subprocess.run([sys.executable, "-m", "builder", "list"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT)})
    assert result.returncode == 2 and "specs/config.yaml" in result.stderr


def test_bad_arguments_exit_2():
    result = subprocess.run([sys.executable, "-m", "builder", "build"], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 2
