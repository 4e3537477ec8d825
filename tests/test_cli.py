"""The command line: one function per verb, documented, with the promised exit codes."""

import subprocess
import sys

from builder.cli import VERBS, parser
from conftest import PROJECT


def test_every_verb_has_a_subcommand_and_help():
    subcommands = parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == set(VERBS)
    assert all(help_text for _, help_text in VERBS.values())


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
