"""The command line: one function per verb, documented, with the promised exit codes and messages."""

import json
import os
import re
import subprocess
import sys

import pytest

from builder import cli
from builder.release.catalog import release_row
from builder.cli import VERBS
from builder.release.resolve import list_releases
from conftest import PROJECT

RELEASE = "smollm2-135m-instruct-fp8-dynamic"


def run_main(capsys, monkeypatch, *argv, cwd=PROJECT) -> tuple:
    """cli.main in this process (argparse's own exits included): (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_explains_itself_with_help(verb):
    result = subprocess.run([sys.executable, "-m", "builder", verb, "--help"], cwd=PROJECT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and VERBS[verb][1] in " ".join(result.stdout.split())


def test_bare_builder_shows_the_help_with_every_verb_and_exits_2(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("usage: builder") and "required" not in err
    assert all(re.search(rf"^\s+{re.escape(verb)}\b", err, flags=re.M) for verb in VERBS)


def test_a_usage_error_shows_the_verbs_help_before_the_error(capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "build", RELEASE, "--no-such-flag")
    assert code == 2
    assert err.index("usage: builder build") < err.index("--force") < err.index("error: unrecognized arguments")


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file_and_exit_1(capsys, monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("expected m1 and m2 to have the same dtype")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read on first use
    monkeypatch.setitem(VERBS, "list", (broken, VERBS["list"][1]))
    code, out, err = run_main(capsys, monkeypatch, "list")
    assert code == 1 and out == "" and "Traceback" not in err and len(err.splitlines()) == 2
    assert err.startswith("builder list: internal error: RuntimeError: expected m1 and m2 to have the same dtype\n")
    report = next(tmp_path.glob("builder-crash-*.txt"))
    assert str(report) in err and report.read_text().startswith("builder list\n")
    assert "Traceback" in report.read_text() and "in broken" in report.read_text()


def test_a_python_without_the_builders_packages_gets_one_line_naming_the_package_and_exit_2(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # what `dvc repro` runs when `python` is not the project's
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), "-m", "builder", "list"], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert re.fullmatch(r"builder list: error: this Python \(\S+/bare/bin/python\) cannot import '\w+', which the "
                        r"builder needs; run it in the environment the README's install command made \(pip install "
                        r"-e \.\)\n", done.stderr), done.stderr


def test_resolve_without_a_release_names_release_as_what_is_missing(capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "resolve")
    assert code == 2
    assert err.strip().splitlines()[-1] == "builder resolve: error: the following arguments are required: RELEASE"


def test_an_unknown_override_key_names_the_group_and_its_keys_instead_of_hydras_plus_hint(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "resolve", RELEASE, "context.max_len=4096")
    assert code == 2 and out == ""
    assert err == ("builder resolve: error: override 'context.max_len=4096' (specs/context/2k.yaml): group context "
                   "has no key max_len; its keys: buckets, max_model_len, max_num_seqs, prefill_chunk_size\n")


def test_an_unknown_nested_key_lists_the_keys_at_its_level(capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "resolve", RELEASE, "quant.weights.bits=4")
    assert code == 2 and "+quant" not in err
    assert "(specs/quant/fp8-dynamic.yaml): quant.weights has no key bits; its keys: " in err and "num_bits" in err


def test_an_unknown_group_lists_the_spec_top_level_keys(capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "resolve", RELEASE, "contexts.max_model_len=4096")
    assert code == 2
    assert "the spec has no group contexts; its groups: calibration, context, eval," in err


def test_a_key_below_a_value_says_the_value_has_no_keys(capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "resolve", RELEASE, "context.max_model_len.low=1")
    assert code == 2 and "context.max_model_len is a value, not a group: it has no key low" in err


def test_list_shows_each_release_with_recipe_target_and_its_header_comment(capsys, monkeypatch):
    code, out, _ = run_main(capsys, monkeypatch, "list")
    header, *lines = out.splitlines()
    assert code == 0 and header.split() == ["release", "recipe", "target", "description"]
    assert [line.split()[0] for line in lines] == list_releases(PROJECT)
    row = next(line for line in lines if line.split()[0] == RELEASE)
    assert row.split()[1:3] == ["fp8-dynamic", "vllm-h100"]
    assert row.endswith("SmolLM2-135M-Instruct with FP8 per-channel weights and dynamic per-token FP8 activations, "
                        "for vLLM on H100.")


@pytest.mark.parametrize("release", list_releases(PROJECT))
def test_every_shipped_release_has_a_one_line_description_and_the_recipe_its_lock_records(release):
    row = release_row(PROJECT, release)
    lock = json.loads((PROJECT / "locks" / f"{release}.json").read_text())
    assert (row["recipe"], row["target"]) == (lock["spec"]["choices"]["quant"], lock["spec"]["choices"]["target"])
    assert row["description"].endswith(".") and "\n" not in row["description"] and len(row["description"]) > 20


def test_list_json_and_names_are_for_scripts(capsys, monkeypatch):
    _, out, _ = run_main(capsys, monkeypatch, "list", "--json")
    rows = json.loads(out)
    assert [row["release"] for row in rows] == list_releases(PROJECT)
    assert set(rows[0]) == {"release", "recipe", "target", "description"}
    _, out, _ = run_main(capsys, monkeypatch, "list", "--names")
    assert out.split("\n")[:-1] == list_releases(PROJECT)


def test_a_release_description_is_a_comment_so_editing_it_changes_no_lock(repo):
    repo.add_model("tiny-llama")
    repo.run("lock", check=0)
    spec = repo.root / "specs" / "release" / "tiny-llama-bf16.yaml"
    spec.write_text(spec.read_text().replace("# @package _global_\n", "# @package _global_\n# A new line. More.\n"))
    assert repo.run("lock", "--check").returncode == 0
    rows = {row["release"]: row for row in json.loads(repo.run("list", "--json", check=0).stdout)}
    assert rows["tiny-llama-bf16"] == {"release": "tiny-llama-bf16", "recipe": "bf16", "target": "cpu",
                                       "description": "A new line."}


def summary(stderr: str) -> str:
    """The labelled block a build ends with on stderr (from `artifact:` on)."""
    return stderr[stderr.index("artifact:       "):]


def test_build_prints_the_path_then_the_same_labelled_result_whether_it_built_or_was_up_to_date(repo):
    repo.add_model("tiny-llama")
    repo.run("lock", check=0)
    fresh = repo.run("build", "tiny-llama-fp8-dynamic", check=0)
    again = repo.run("build", "tiny-llama-fp8-dynamic", check=0)
    assert fresh.stdout == again.stdout == "artifacts/tiny-llama-fp8-dynamic\n"
    assert summary(fresh.stderr) == summary(again.stderr)
    manifest = json.loads((repo.root / "artifacts" / "tiny-llama-fp8-dynamic" / "manifest.json").read_text())
    serve = json.loads((repo.root / "artifacts" / "tiny-llama-fp8-dynamic" / "serve.json").read_text())
    assert summary(fresh.stderr).splitlines() == [
        "artifact:       artifacts/tiny-llama-fp8-dynamic", "release:        tiny-llama-fp8-dynamic",
        f"artifact_id:    {manifest['artifact_id']}", f"content digest: {manifest['content_digest']}", "next:",
        "  builder verify artifacts/tiny-llama-fp8-dynamic", "  builder eval artifacts/tiny-llama-fp8-dynamic",
        f"  {serve['command']}"]
    assert serve["command"].split()[1:4] == ["vllm", "serve", "artifacts/tiny-llama-fp8-dynamic"]


def test_build_json_and_an_overridden_build_show_the_folder_named_after_the_artifact_id(repo):
    repo.add_model("tiny-llama")
    result = repo.run("build", "tiny-llama-bf16", "release.version=0.0.2", "--json", check=0)
    shown = json.loads(result.stdout)
    manifest = json.loads((repo.root / shown["path"] / "manifest.json").read_text())
    assert shown == {"path": f"artifacts/tiny-llama-bf16-{manifest['artifact_id'].split(':')[1][:12]}",
                     "release": "tiny-llama-bf16", "artifact_id": manifest["artifact_id"],
                     "content_digest": manifest["content_digest"]}
    assert f"builder verify {shown['path']}" in result.stderr
    assert f" serve {shown['path']} " in result.stderr  # serve.json says artifacts/tiny-llama-bf16


def test_a_build_with_out_points_every_next_command_at_that_folder(repo, tmp_path):
    repo.add_model("tiny-llama")
    out = tmp_path / "elsewhere"
    result = repo.run("build", "tiny-llama-fp8-dynamic", "--out", str(out), check=0)
    assert result.stdout == f"{out}\n"
    commands = summary(result.stderr).split("next:\n")[1].splitlines()
    assert [c.split()[1:4] for c in commands] == [["verify", str(out)], ["eval", str(out)], ["vllm", "serve", str(out)]]
    assert json.loads((out / "serve.json").read_text())["model"] == "artifacts/tiny-llama-fp8-dynamic"  # bytes as in place


def test_python_dash_m_builder_lists_the_shipped_releases():
    result = subprocess.run([sys.executable, "-m", "builder", "list", "--names"], cwd=PROJECT / "specs",
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert RELEASE in result.stdout.split()


def test_outside_a_repository_the_error_says_where_to_go(tmp_path):
    result = subprocess.run([sys.executable, "-m", "builder", "list"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT)})
    assert result.returncode == 2 and "specs/config.yaml" in result.stderr


def test_bad_arguments_exit_2_with_the_help():
    result = subprocess.run([sys.executable, "-m", "builder", "build"], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: builder build" in result.stderr and "--calibration-stats" in result.stderr
