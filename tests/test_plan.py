"""`builder plan`: what a branch changes against a git revision, release by release."""

import json

import pytest

from builder.release import lock
from builder.pipeline import plan
from builder.errors import BuilderError
from conftest import Pipeline

FP8 = "smollm2-135m-instruct-fp8-dynamic"
RELEASES = ("smollm2-135m-instruct-bf16", FP8)  # of the shipped ones; fp8-dynamic's only user is FP8


def keep_only(repo, names=RELEASES) -> None:
    for release in (repo.root / "specs" / "release").glob("*.yaml"):
        if release.stem not in names:
            release.unlink()


@pytest.fixture
def branch(repo) -> Pipeline:
    """The shipped specs committed on main, then a branch `faster-fp8` that edits one recipe."""
    keep_only(repo)
    git = Pipeline(repo.root)
    git.git("init", "-q", "-b", "main")
    lock.write(repo.root)
    git.commit("releases")
    git.git("checkout", "-q", "-b", "faster-fp8")
    recipe = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    recipe.write_text(recipe.read_text().replace("strategy: channel ", "strategy: tensor  ")
                      .replace("ignore: [lm_head]", "ignore: [lm_head, 're:.*down_proj|.*up_proj']"))
    lock.write(repo.root)
    git.commit("fp8-dynamic: per-tensor weight scales; keep the MLP in BF16")
    return git


def test_plan_of_a_branch_that_changes_one_recipe_is_the_expected_report(branch):
    main = branch.git("rev-parse", "main").stdout.strip()
    old = json.loads(branch.git("show", f"main:locks/{FP8}.json").stdout)["artifact_id"]
    new = lock.read(branch.root, FP8)["artifact_id"]
    result = branch.run("plan", check=0)
    assert result.stdout == f"""\
## Release plan against merge base with main (`{main[:12]}`)

0 added, 0 removed, 1 changed, 1 unchanged.

### Changed: `{FP8}`

- artifact_id: `{old}` -> `{new}`
- source weights: unchanged

| key | old | new |
|---|---|---|
| `quant.ignore` | `["lm_head"]` | `["lm_head", "re:.*down_proj\\|.*up_proj"]` |
| `quant.weights.strategy` | `"channel"` | `"tensor"` |
"""


def test_plan_json_lists_added_removed_and_weight_changes(branch):
    releases = branch.root / "specs" / "release"
    bf16 = (releases / "smollm2-135m-instruct-bf16.yaml").read_text()
    (releases / "smollm2-135m-instruct-bf16.yaml").unlink()
    (releases / "smollm2-135m-instruct-bf16-v2.yaml").write_text(bf16.replace("-bf16\n", "-bf16-v2\n"))
    model = branch.root / "specs" / "model" / "smollm2-135m-instruct.yaml"
    model.write_text(model.read_text().replace("digest: sha256:5", "digest: sha256:6"))
    report = plan.plan(branch.root, base="main")
    assert report["base"] == "main"
    assert [a["release"] for a in report["added"]] == ["smollm2-135m-instruct-bf16-v2"]
    assert [r["release"] for r in report["removed"]] == ["smollm2-135m-instruct-bf16"]
    (change,) = report["changed"]
    assert change["weights"]["old"] != change["weights"]["new"]
    assert {"key": "model.digest", "old": change["weights"]["old"], "new": change["weights"]["new"]} in change["spec"]
    assert "weights" in change["inputs"]
    assert "source weights: changed" in plan.markdown(report)


def test_plan_against_a_revision_that_does_not_exist_is_a_clear_error(branch):
    result = branch.run("plan", "--base", "no-such-branch")
    assert result.returncode == 2
    assert "'no-such-branch' is not a commit in this repository" in result.stderr
    assert result.stdout == ""


def test_plan_outside_git_or_without_a_main_branch_says_what_to_pass(repo, tmp_path):
    with pytest.raises(BuilderError, match="not a git repository"):
        plan.plan(repo.root)
    keep_only(repo)
    git = Pipeline(repo.root)
    git.git("init", "-q", "-b", "trunk")
    git.commit("releases")
    with pytest.raises(BuilderError, match="--base GIT_REV"):
        plan.plan(repo.root)
    assert [a["release"] for a in plan.plan(repo.root, "HEAD")["added"]] == list(RELEASES)
