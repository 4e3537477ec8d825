"""Resolving specs: every shipped release resolves; errors name file, key and what is allowed."""

import random
import shutil

import pytest
import yaml

from builder.canonical import canonical_json
from builder.errors import BuilderError
from builder.release.lock import lock_entry
from builder.release.resolve import list_releases, resolve
from conftest import PROJECT

SHIPPED = list_releases(PROJECT)


def problems_of(root, release, *overrides) -> str:
    with pytest.raises(BuilderError) as caught:
        resolve(root, release, overrides)
    return caught.value.render()


@pytest.mark.parametrize("release", SHIPPED)
def test_every_shipped_release_resolves_and_validates(release):
    spec = resolve(PROJECT, release)
    assert spec["release"]["name"] == release == spec["choices"]["release"]
    assert set(spec["choices"]) == {"model", "quant", "target", "parallelism", "context", "calibration",
                                    "eval", "release"}


@pytest.mark.parametrize("release", SHIPPED)
def test_resolving_is_byte_stable(release):
    assert canonical_json(lock_entry(PROJECT, release)) == canonical_json(lock_entry(PROJECT, release))


# Options no shipped release can use, and where they are exercised instead.
UNUSED = {("quant", "fp8-block"): "SmolLM2's 576/192-wide layers do not split into 128 x 128 blocks "
                                  "(vLLM refuses them); tests/test_fp8_block.py builds it on tiny models",
          ("quant", "fp8-block-legacy"): "the same, in the legacy layout",
          ("target", "vllm-h200"): "lists the block-FP8 scheme; tests/test_fp8_block.py builds for it",
          ("quant", "w4afp8"): "its group of 128 does not divide SmolLM2's 576 features (vLLM's W4A8 kernel takes "
                               "no other); tests/test_fp4.py builds it on tiny models",
          ("quant", "gpt-oss-mxfp4"): "gpt-oss's own MXFP4, for gpt-oss only; tests/test_published_frontier.py and "
                                      "tests/test_golden.py build it on tiny gpt-oss models"}


def test_every_shipped_group_option_is_used_by_some_release():
    used = {(group, option) for release in SHIPPED for group, option in resolve(PROJECT, release)["choices"].items()}
    shipped = {(p.parent.name, p.stem) for p in (PROJECT / "specs").glob("*/*.yaml")}
    assert shipped - set(UNUSED) <= used and not used & set(UNUSED)


def test_resolved_spec_does_not_depend_on_key_order_in_yaml(repo):
    before = lock_entry(repo.root, "smollm2-135m-instruct-fp8-dynamic")["artifact_id"]
    shuffler = random.Random(7)

    def shuffled(node):
        if isinstance(node, dict):
            keys = list(node)
            shuffler.shuffle(keys)
            return {k: shuffled(node[k]) for k in keys}
        return node

    for path in (repo.root / "specs").glob("*/*.yaml"):
        if path.parent.name == "release":
            continue
        path.write_text(yaml.safe_dump(shuffled(yaml.safe_load(path.read_text())), sort_keys=False))
    assert lock_entry(repo.root, "smollm2-135m-instruct-fp8-dynamic")["artifact_id"] == before


def test_comments_and_formatting_do_not_change_the_artifact_id(repo):
    before = lock_entry(repo.root, "smollm2-135m-instruct-fp8-dynamic")["artifact_id"]
    quant = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    quant.write_text("# a reviewer's note\n\n" + quant.read_text().replace("num_bits: 8", "num_bits:   8  # eight"))
    assert lock_entry(repo.root, "smollm2-135m-instruct-fp8-dynamic")["artifact_id"] == before


def test_resolve_output_does_not_depend_on_the_working_directory(repo):
    top = repo.run("resolve", "smollm2-135m-instruct-fp8-dynamic", "--json", check=0)
    nested = repo.run("resolve", "smollm2-135m-instruct-fp8-dynamic", "--json", check=0,
                      cwd=repo.root / "specs" / "release")
    assert top.stdout == nested.stdout
    assert str(repo.root) not in top.stdout


def test_override_changes_the_spec_and_the_artifact_id():
    plain = lock_entry(PROJECT, "smollm2-135m-instruct-fp8-dynamic")
    changed = lock_entry(PROJECT, "smollm2-135m-instruct-fp8-dynamic", ("context.max_model_len=4096",))
    assert changed["spec"]["context"]["max_model_len"] == 4096
    assert changed["artifact_id"] != plain["artifact_id"]


def test_unknown_key_names_the_group_file_and_the_allowed_keys(repo):
    quant = repo.root / "specs" / "quant" / "fp8-dynamic.yaml"
    quant.write_text(quant.read_text() + "sparsity: 0.5\n")
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic")
    assert "specs/quant/fp8-dynamic.yaml: quant.sparsity: unknown key" in message
    assert "allowed keys: algorithm, awq, dtype, format, ggml_mix, gptq, ignore" in message


def test_wrong_type_and_bad_enum_are_reported_together(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic",
                          "quant.weights.type=posit", "context.max_model_len=long")
    assert message.startswith("2 problems")
    assert "quant.weights.type: \"posit\" is not allowed; allowed: \"int\", \"float\"" in message
    assert "context.max_model_len: \"long\"" in message and "override 'context.max_model_len=long'" in message


def test_unknown_group_option_lists_the_valid_ones(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic", "quant=fp9")
    assert "quant/fp9" in message and "bf16" in message and "fp8-dynamic" in message


def test_bad_override_syntax_names_the_override(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic", "quant.weights.num_bits=[1")
    assert message.startswith("override 'quant.weights.num_bits=[1'")


def test_missing_release_lists_known_releases(repo):
    message = problems_of(repo.root, "no-such-release")
    assert "specs/release/no-such-release.yaml" in message and "smollm2-135m-instruct-bf16" in message
    assert "did you mean" not in message  # nothing near it


def test_a_mistyped_release_name_suggests_the_nearest_releases_first(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dinamic")  # a typo
    suggestion = message.split("did you mean ", 1)[1].split("?", 1)[0]
    assert suggestion.split(" or ")[0] == "smollm2-135m-instruct-fp8-dynamic"
    assert message.index("did you mean") < message.index("known:")


def test_key_set_in_the_release_file_is_attributed_to_it(repo):
    release = repo.root / "specs" / "release" / "smollm2-135m-instruct-bf16.yaml"
    release.write_text(release.read_text() + "context:\n  max_model_len: 0\n")
    message = problems_of(repo.root, "smollm2-135m-instruct-bf16")
    assert "specs/release/smollm2-135m-instruct-bf16.yaml: context.max_model_len" in message


def test_release_name_must_match_its_file_name(repo):
    source = repo.root / "specs" / "release" / "smollm2-135m-instruct-bf16.yaml"
    shutil.copy(source, source.with_name("renamed.yaml"))
    assert "must equal the file name 'renamed'" in problems_of(repo.root, "renamed")


@pytest.mark.parametrize("override, expected", [
    ("parallelism.tensor=2", "parallelism.tensor: 2 does not divide model num_attention_heads 9"),
    ("parallelism.pipeline=31", "parallelism.pipeline: 31 exceeds the model's 30 layers"),
    ("context.max_model_len=9000", "9000 tokens exceeds the model's max_position_embeddings 8192"),
    ("target=cpu", None),
])
def test_resolve_rejects_choices_that_do_not_fit_the_model(override, expected):
    if expected is None:
        assert resolve(PROJECT, "smollm2-135m-instruct-fp8-dynamic", (override,))
        return
    assert expected in problems_of(PROJECT, "smollm2-135m-instruct-fp8-dynamic", override)


def test_resolve_rejects_a_recipe_the_target_cannot_run(repo):
    target = repo.root / "specs" / "target" / "cpu.yaml"
    target.write_text(target.read_text().replace("schemes: [w16a16, w8a8-fp8, w8a8-int8]", "schemes: [w16a16]"))
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic", "target=cpu")
    assert "does not run w8a8-fp8" in message and "it runs: w16a16" in message


def test_malformed_yaml_is_an_input_error_naming_the_file(repo):
    (repo.root / "specs" / "quant" / "fp8-dynamic.yaml").write_text("weights: [unclosed\n")
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic")
    assert "fp8-dynamic" in message


def test_cli_reports_spec_errors_with_exit_code_2_and_writes_nothing(repo):
    result = repo.run("resolve", "smollm2-135m-instruct-fp8-dynamic", "quant.weights.num_bits=3", "+quant.bogus=1")
    assert result.returncode == 2
    assert result.stderr.count("\n") >= 2 and "Traceback" not in result.stderr
    assert sorted(p.name for p in repo.root.iterdir()) == ["data", "specs"]


def test_an_override_of_an_unknown_key_answers_with_the_allowed_keys_not_hydras_hint(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic", "context.max_len=4096")
    assert message == ("override 'context.max_len=4096' (specs/context/2k.yaml): group context has no key max_len; "
                       "its keys: buckets, max_model_len, max_num_seqs, prefill_chunk_size")


def test_an_override_of_an_allowed_key_no_file_sets_says_to_add_it_with_plus(repo):
    message = problems_of(repo.root, "smollm2-135m-instruct-fp8-dynamic", "quant.awq.grid=4")
    assert message.endswith("quant.awq.grid: allowed, but no chosen spec file sets it: add it with +quant.awq.grid=4")
