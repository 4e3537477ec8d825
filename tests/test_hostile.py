"""Hostile input: every bad input gets exit code 2, one message naming file/key/value, nothing written."""

import json
import os
import shutil
import struct

import pytest
import yaml

from builder import cli
from builder.canonical import file_entries, tree_digest
from conftest import Repo

RELEASE = "tiny-llama-fp8-dynamic"
MODEL = "specs/model/tiny-llama.yaml"
WEIGHTS = "weights/tiny-llama"
CALIBRATED = ["quant=fp8-static", "calibration=licenses", "target=vllm-h100"]  # a recipe that calibrates


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Repo:
    repo = Repo.fresh(tmp_path_factory.mktemp("hostile") / "repo")
    repo.add_model("tiny-llama")
    return repo


# --- small mutations of a good repository ------------------------------------------------------

def append(relative, text):
    def mutate(root):
        with open(root / relative, "a") as handle:
            handle.write(text)
    return mutate


def replace(relative, old, new):
    def mutate(root):
        path = root / relative
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return mutate


def edit_model(**changes):
    def mutate(root):
        spec = yaml.safe_load((root / MODEL).read_text())
        for dotted, value in changes.items():
            node, *_, last = [spec, *dotted.split("__")]
            for part in dotted.split("__")[:-1]:
                node = node[part]
            node[last] = value
        (root / MODEL).write_text(yaml.safe_dump(spec))
    return mutate


def repin(root):
    """Pin the weights' current digest, so the case tests what it means to, not the digest check."""
    digest = tree_digest(file_entries(root / WEIGHTS))
    edit_model(digest=digest)(root)


def then_repin(mutate):
    def both(root):
        mutate(root)
        repin(root)
    return both


def rewrite_tensors(change):
    """Rewrite the tiny checkpoint through safetensors after change(dict of tensors)."""
    def mutate(root):
        from safetensors.torch import load_file, save_file

        path = root / WEIGHTS / "model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return then_repin(mutate)


def corrupt_header(root):
    path = root / WEIGHTS / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 64) + b"{not json" + data[17:])


def truncate(root):
    path = root / WEIGHTS / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def add_auto_map(root):
    path = root / WEIGHTS / "config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    path.write_text(json.dumps(config))


def link_outside(root):
    outside = root.parent / "outside.txt"
    outside.write_text("secret")
    os.symlink(outside, root / WEIGHTS / "notes.txt")


def weights_dir_is_a_link(root):
    shutil.move(root / WEIGHTS, root.parent / "elsewhere")
    os.symlink(root.parent / "elsewhere", root / WEIGHTS)


def nothing(root):
    pass


def locked_then_edited(root):
    cli.main(["lock"])
    replace(f"specs/release/{RELEASE}.yaml", "0.0.1", "0.0.2")(root)


def not_an_artifact(root):
    (root / "somewhere").mkdir()
    (root / "somewhere" / "keep.txt").write_text("user data")


CASES = [
    # id, mutation, arguments, substrings the message must contain
    ("malformed-yaml-group", append("specs/quant/fp8-dynamic.yaml", "weights: [unclosed\n"), ["resolve", RELEASE], ["fp8-dynamic"]),
    ("malformed-yaml-release", append(f"specs/release/{RELEASE}.yaml", "release: {name\n"), ["resolve", RELEASE], [RELEASE]),
    ("unknown-key-top", append(f"specs/release/{RELEASE}.yaml", "colour: blue\n"), ["resolve", RELEASE], [f"specs/release/{RELEASE}.yaml: colour: unknown key"]),
    ("unknown-key-model", append(MODEL, "revisions: main\n"), ["resolve", RELEASE], [f"{MODEL}: model.revisions: unknown key"]),
    ("unknown-key-architecture", edit_model(architecture__rope=1), ["resolve", RELEASE], ["model.architecture.rope: unknown key"]),
    ("unknown-key-quant-args", replace("specs/quant/fp8-dynamic.yaml", "  num_bits: 8\n  type: float\n  strategy: channel", "  num_bits: 8\n  observer: mse\n  type: float\n  strategy: channel"), ["resolve", RELEASE], ["specs/quant/fp8-dynamic.yaml: quant.weights.observer: unknown key"]),
    ("unknown-key-target-device", append("specs/target/cpu.yaml", "vendor_magic: acme\n"), ["resolve", RELEASE], ["specs/target/cpu.yaml: target.vendor_magic: unknown key"]),
    ("unknown-key-context", append("specs/context/2k.yaml", "max_tokens_ever: 3\n"), ["resolve", RELEASE], ["context.max_tokens_ever: unknown key"]),
    ("unknown-key-parallelism", append("specs/parallelism/tp1.yaml", "sharding_magic: 2\n"), ["resolve", RELEASE], ["parallelism.sharding_magic: unknown key"]),
    ("unknown-key-release", replace(f"specs/release/{RELEASE}.yaml", "  version: 0.0.1", "  version: 0.0.1\n  owner: me"), ["resolve", RELEASE], ["release.owner: unknown key"]),
    ("unknown-key-calibration", append("specs/calibration/none.yaml", "shuffle_magic: true\n"), ["resolve", RELEASE], ["calibration.shuffle_magic: unknown key"]),
    ("trust-remote-code-key", nothing, ["resolve", RELEASE, "+model.trust_remote_code=true"], ["model.trust_remote_code: unknown key"]),
    ("wrong-type-int", nothing, ["resolve", RELEASE, "context.max_model_len=long"], ["context.max_model_len", '"long"']),
    ("wrong-type-float", nothing, ["resolve", RELEASE, "parallelism.tensor=1.5"], ["parallelism.tensor", "1.5"]),
    ("wrong-type-bool", nothing, ["resolve", RELEASE, "quant.weights.symmetric=maybe"], ["quant.weights.symmetric", '"maybe"']),
    ("wrong-type-list", nothing, ["resolve", RELEASE, "quant.targets=Linear"], ["quant.targets", '"Linear"']),
    ("negative-size", edit_model(architecture__hidden_size=-64), ["resolve", RELEASE], ["model.architecture.hidden_size", "-64"]),
    ("unknown-option-quant", nothing, ["resolve", RELEASE, "quant=fp9"], ["quant/fp9", "bf16", "fp8-dynamic"]),
    ("unknown-option-target", nothing, ["resolve", RELEASE, "target=tpu-v5"], ["target/tpu-v5", "cpu", "vllm-h100"]),
    ("override-syntax-space", nothing, ["resolve", RELEASE, "a b"], ["override 'a b'"]),
    ("override-syntax-bracket", nothing, ["resolve", RELEASE, "x=[1"], ["override 'x=[1'"]),
    ("override-unknown-key", nothing, ["resolve", RELEASE, "quant.nonexistent=1"], ["quant.nonexistent"]),
    ("missing-release", nothing, ["resolve", "no-such-release"], ["specs/release/no-such-release.yaml", RELEASE]),
    ("absolute-path", nothing, ["resolve", RELEASE, "model.path=/etc"], ["model.path", '"/etc"']),
    ("path-escapes", nothing, ["resolve", RELEASE, "model.path=../outside"], ["model.path", "../outside"]),
    ("bad-digest-format", nothing, ["resolve", RELEASE, "model.digest=md5:abc"], ["model.digest", "md5:abc"]),
    ("release-name-mismatch", nothing, ["resolve", RELEASE, "release.name=other"], ["release.name", "must equal the file name"]),
    ("bad-version", nothing, ["resolve", RELEASE, "release.version=one"], ["release.version", '"one"']),
    ("tp-not-dividing", nothing, ["resolve", RELEASE, "parallelism.tensor=3"], ["parallelism.tensor: 3 does not divide model num_attention_heads 4"]),
    ("pp-over-layers", nothing, ["resolve", RELEASE, "parallelism.pipeline=5"], ["parallelism.pipeline: 5 exceeds the model's 2 layers"]),
    ("context-too-long", nothing, ["resolve", RELEASE, "context.max_model_len=4096"], ["4096 tokens exceeds the model's max_position_embeddings 2048"]),
    ("target-cannot-run", nothing, ["resolve", RELEASE, "target.schemes=[w16a16]"], ["does not run w8a8-fp8"]),
    ("fp8-with-4-bits", nothing, ["resolve", RELEASE, "quant.weights.num_bits=4"], ["quant.weights", "FP8 E4M3"]),
    ("group-size-without-group", nothing, ["resolve", RELEASE, "quant.weights.group_size=64"], ["quant.weights.group_size", "64"]),
    ("lock-with-broken-release", append(f"specs/release/{RELEASE}.yaml", "colour: blue\n"), ["lock"], ["colour: unknown key"]),
    ("missing-weights", lambda root: shutil.rmtree(root / WEIGHTS), ["build", RELEASE], [f"{MODEL}: model.path", "builder import tiny-llama"]),
    ("digest-mismatch", append(f"{WEIGHTS}/config.json", " "), ["build", RELEASE], [f"{MODEL}: model.digest", "refusing"]),
    ("partial-weights", rewrite_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), ["build", RELEASE], ["model.layers.1.mlp.up_proj.weight: missing from the checkpoint"]),
    ("pickle-weights", then_repin(lambda root: (root / WEIGHTS / "pytorch_model.bin").write_bytes(b"\x80\x04")), ["build", RELEASE], ["pickle", "pytorch_model.bin"]),
    ("remote-code", then_repin(add_auto_map), ["build", RELEASE], ["remote code"]),
    ("symlink-outside", then_repin(link_outside), ["build", RELEASE], ["outside the repository"]),
    ("weights-dir-links-outside", weights_dir_is_a_link, ["build", RELEASE], ["model.path", "outside the repository"]),
    ("corrupt-header", then_repin(corrupt_header), ["build", RELEASE], ["model.safetensors", "corrupt safetensors header"]),
    ("truncated-data", then_repin(truncate), ["build", RELEASE], ["model.safetensors", "truncated"]),
    ("unexpected-dtype", rewrite_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(__import__("torch").int8)})), ["build", RELEASE], ["model.norm.weight", "dtype I8"]),
    ("unexpected-shape", rewrite_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"][:32]})), ["build", RELEASE], ["model.layers.0.self_attn.q_proj.weight", "shape [32, 64]", "[64, 64]"]),
    ("missing-tokenizer", then_repin(lambda root: (root / WEIGHTS / "tokenizer.json").unlink()), ["build", RELEASE], ["missing tokenizer files: tokenizer.json or tokenizer.model"]),
    ("architecture-mismatch", edit_model(architecture__intermediate_size=256), ["build", RELEASE], ["model.architecture.intermediate_size", "256 declared", "config.json means 128"]),
    ("out-is-user-folder", not_an_artifact, ["build", RELEASE, "--out", "somewhere"], ["somewhere", "not an artifact"]),
    ("stale-lock", locked_then_edited, ["build", RELEASE], [f"locks/{RELEASE}.json", "builder lock"]),
    ("verify-not-an-artifact", nothing, ["verify", "specs"], ["not an artifact"]),
    ("import-unknown-model", nothing, ["import", "no-such-model"], ["specs/model/no-such-model.yaml", "tiny-llama"]),
    ("import-local-source", lambda root: shutil.rmtree(root / WEIGHTS), ["import", "tiny-llama"], [f"{MODEL}: source.kind", "local"]),
    ("import-gguf-wrong-digest", replace("specs/model/smollm2-135m-instruct.yaml", "sha256: sha256:b1", "sha256: sha256:c1"), ["import", "smollm2-135m-instruct"], ["source.sha256", "pinned digest"]),
    ("empty-calibration-text", lambda root: (root / "data" / "calibration.txt").write_text(""), ["build", RELEASE, *CALIBRATED], ["specs/calibration/licenses.yaml: calibration.samples"]),
    ("short-calibration-text", lambda root: (root / "data" / "calibration.txt").write_text("w1 w2 w3\n"), ["build", RELEASE, *CALIBRATED], ["specs/calibration/licenses.yaml: calibration.samples", "64"]),
    ("missing-calibration-file", lambda root: (root / "data" / "calibration.txt").unlink(), ["build", RELEASE, *CALIBRATED], ["calibration.dataset", "no such file"]),
    ("bad-argument", nothing, ["build"], []),
    ("unknown-device", nothing, ["resolve", RELEASE, "calibration.device=tpu"], ["calibration.device", '"tpu" is not allowed; allowed: "cpu", "cuda"']),
]
if not __import__("torch").cuda.is_available():  # these machines have no GPU: asking for one is bad input here
    CASES.append(("cuda-without-a-gpu", nothing, ["build", RELEASE, *CALIBRATED, "calibration.device=cuda"],
                  ["specs/calibration/licenses.yaml: calibration.device", "torch sees no CUDA device"]))


def snapshot(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("mutate, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(pristine, tmp_path, monkeypatch, capsys,
                                                                 mutate, argv, expected):
    root = tmp_path / "repo"
    shutil.copytree(pristine.root, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("BUILDER_ROOT", raising=False)
    mutate(root)
    capsys.readouterr()
    before = snapshot(root)
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    for text in expected:
        assert text in error, error
    assert snapshot(root) == before


def test_the_corpus_is_at_least_forty_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
