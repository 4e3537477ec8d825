"""The spec's typed models: they forbid unknown keys, keep the bytes of every shipped lock, agree with
the committed JSON Schema and with compressed-tensors' names; the Release object round-trips a lock."""

import ast
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from builder import paths
from builder.canonical import canonical_json, pretty_json
from builder.release import models, quantization, schema
from builder.release.lock import read
from builder.release.models import Spec
from builder.release.quantization import Args, Group
from builder.release.release import Release
from builder.release.resolve import list_releases
from builder.release.validate import typed
from conftest import PROJECT

SHIPPED = list_releases(PROJECT)
FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
               "group_size": None}


def groups() -> list:
    """Every typed model of the spec (each group, and each part of one)."""
    found = {value for module in (models, quantization) for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, Group) and value is not Group}
    return sorted(found, key=lambda cls: cls.__name__)


def spec_of(release: str) -> dict:
    return read(PROJECT, release)["spec"]


def test_the_committed_schema_is_what_the_models_generate():
    committed = (paths.SCHEMAS_DIR / schema.FILE).read_text(encoding="utf-8")
    assert committed == schema.text(), "run: python -m builder.release.schema"
    assert schema.main(["--check"]) == 0


def test_schema_generation_does_not_depend_on_the_process():
    command = [sys.executable, "-c", "from builder.release import schema; print(schema.text(), end='')"]
    texts = {subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(PROJECT)}).stdout
             for seed in ("0", "1", "12345")}
    assert texts == {schema.text()}


def test_the_generated_schema_is_draft_2020_12_and_accepts_every_shipped_spec():
    Draft202012Validator.check_schema(schema.generate())
    validator = Draft202012Validator(schema.generate())
    for release in SHIPPED:
        assert list(validator.iter_errors(spec_of(release))) == [], release


def test_the_generated_schema_refuses_what_the_models_refuse():
    validator = Draft202012Validator(schema.generate())
    spec = spec_of("smollm2-135m-instruct-fp8-dynamic")
    for broken in ({**spec, "colour": "blue"}, {**spec, "quant": {**spec["quant"], "sparsity": 0.5}},
                   {**spec, "calibration": {"dataset": "data/calibration.txt", "device": "cpu"}}):
        assert list(validator.iter_errors(broken)) and typed(broken)[1]


@pytest.mark.parametrize("release", SHIPPED)
def test_a_typed_spec_keeps_the_bytes_of_every_shipped_lock(release):
    entry = read(PROJECT, release)
    assert canonical_json(Spec.of(entry["spec"]).data()) == canonical_json(entry["spec"])
    text = (PROJECT / "locks" / f"{release}.json").read_text(encoding="utf-8")
    assert pretty_json(Release.from_entry(entry).to_entry()) == text


def objects(node) -> list:
    """Every schema node that lists properties, anywhere in node (if/then conditions aside)."""
    if isinstance(node, list):
        return [found for item in node for found in objects(item)]
    if not isinstance(node, dict):
        return []
    nested = [found for key, value in node.items() if key not in ("if", "then") for found in objects(value)]
    return ([node] if "properties" in node else []) + nested


@pytest.mark.parametrize("model", groups(), ids=lambda cls: cls.__name__)
def test_every_group_forbids_unknown_keys_and_coercion(model):
    assert model.model_config["extra"] == "forbid" and model.model_config["strict"]


def test_every_object_of_the_schema_forbids_unknown_keys():
    found = objects(schema.generate())
    assert len(found) > 20 and all(node["additionalProperties"] is False for node in found)


def test_an_unknown_key_is_named_with_the_allowed_keys():
    spec = spec_of("smollm2-135m-instruct-fp8-dynamic")
    _, found = typed({**spec, "target": {**spec["target"], "device": {**spec["target"]["device"], "vendor": 1}}})
    assert found == [(("target", "device", "vendor"),
                      "unknown key; allowed keys: compute_capability, count, kind, memory_bytes, name")]


def test_types_are_strict_and_numbers_keep_their_json_type():
    with pytest.raises(ValidationError):
        Args.of({**FP8_CHANNEL, "num_bits": "8"})
    with pytest.raises(ValidationError):
        Args.of({**FP8_CHANNEL, "symmetric": 1})
    gate = models.Gate.of({"max_perplexity_increase_pct": 5, "max_mean_kl": 0.05})
    assert json.dumps(gate.data(), sort_keys=True) == '{"max_mean_kl": 0.05, "max_perplexity_increase_pct": 5}'


def test_keys_a_spec_leaves_out_stay_out_and_take_their_defaults():
    args = Args.of(FP8_CHANNEL)
    assert args.observer == "minmax" and args.search == {} and args.data() == FP8_CHANNEL


def test_quantization_args_use_compressed_tensors_names_and_values():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    assert set(Args.model_fields) <= set(QuantizationArgs.model_fields)
    assert set(Args.model_fields["strategy"].annotation.__args__) <= {s.value for s in QuantizationStrategy}
    assert set(Args.model_fields["type"].annotation.__args__) <= {t.value for t in QuantizationType}
    assert QuantizationArgs(**Args.of(FP8_CHANNEL).as_dict()).strategy == "channel"


def test_a_dataset_needs_its_sampling_keys_and_an_hf_source_its_revision():
    spec = spec_of("smollm2-135m-instruct-fp8-dynamic")
    _, found = typed({**spec, "calibration": {"dataset": "data/calibration.txt", "device": "cpu"}})
    assert [path[-1] for path, _ in found] == ["samples", "seed", "sequence_length", "split"]
    assert all(message == "missing required key (a dataset is given)" for _, message in found)
    _, found = typed({**spec, "model": {**spec["model"], "source": {"kind": "hf"}}})
    assert found == [(("model", "revision"), "missing required key (source hf)")]


def test_release_names_its_artifact_folder_and_gguf_file():
    for release in SHIPPED:
        entry = read(PROJECT, release)
        typed_release = Release.from_entry(entry)
        assert typed_release.artifact_name == release
        overridden = Release.from_entry({**entry, "overrides": ["context.max_model_len=1024"]})
        assert overridden.artifact_name == f"{release}-{entry['artifact_id'].split(':')[1][:12]}"
        if entry["spec"]["quant"]["format"] == "gguf":
            assert typed_release.gguf_file == f"{release}.gguf"
        else:
            assert typed_release.gguf_file is None
    calibrated = Release.from_entry(read(PROJECT, "smollm2-135m-instruct-w4a16-gptq"))
    assert calibrated.devices == ("cpu",) and Release.from_entry(read(PROJECT, SHIPPED[0])).devices == ()


def test_no_two_modules_define_a_problems_function_of_the_same_name():
    """Outside the format plug-ins, whose `problems` is the one interface function each implements."""
    plugins = PROJECT / "builder" / "formats"
    names = Counter(node.name for path in (PROJECT / "builder").rglob("*.py")
                    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, ast.FunctionDef) and node.name.endswith("problems")
                    and not (path.parent == plugins and node.name == "problems"))
    assert [name for name, count in names.items() if count > 1] == []


def test_a_block_strategy_without_its_block_structure_is_named_and_refused(repo):
    from builder.errors import BuilderError
    from builder.release.resolve import resolve

    with pytest.raises(BuilderError) as caught:
        resolve(repo.root, "smollm2-135m-instruct-fp8-dynamic", ("quant.weights.strategy=block",))
    assert "quant.weights.block_structure: None: block_structure is required with strategy block" in str(caught.value)
