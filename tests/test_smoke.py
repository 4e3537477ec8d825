"""The smoke check every build runs before publishing: the staged artifact, loaded as evaluation loads
its format and with its own tokenizer, generates a few tokens greedily; a failure is exit 1 and leaves
the previous artifact in place."""

import pytest
import yaml

from builder import build
from builder.canonical import file_entries, tree_digest
from builder.check import smoke
from builder.errors import CheckFailed
from conftest import Repo, release_text

# (recipe, target, overrides): one release per output format
FORMATS = {
    "compressed-tensors": ("fp8-dynamic", "vllm-h100", ()),
    "fp8": ("fp8-dynamic", "vllm-h100", ("quant.format=fp8", "quant.weights.strategy=tensor",
                                     "quant.input_activations.strategy=tensor")),
    "dense": ("bf16", "cpu", ()),
    "gguf": ("gguf-q8_0", "llama-cpp", ()),
    "mlx": ("mlx-4bit", "mlx", ()),
}


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (what a GGUF vocabulary needs) and one release per format."""
    repo = Repo.fresh(tmp_path_factory.mktemp("smoke") / "repo")
    repo.add_model("tiny-llama", tokenizer="bpe")
    for fmt, (recipe, target, _) in FORMATS.items():
        text = release_text(f"tiny-llama-{fmt}", "tiny-llama", recipe, target)
        text = text.replace("\n\nrelease:", "\n  - override /calibration: none\n\nrelease:")
        (repo.root / "specs" / "release" / f"tiny-llama-{fmt}.yaml").write_text(text)
    return repo


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_good_build_passes_the_smoke_check_in_every_format_and_writes_nothing_for_it(smoke_repo, fmt, tmp_path):
    out, messages = tmp_path / fmt, []
    manifest = build.build(smoke_repo.root, f"tiny-llama-{fmt}", FORMATS[fmt][2], out=out, log=messages.append)
    assert [m for m in messages if m.startswith("smoke: 4 tokens greedily after 'The capital of France is'")]
    assert files(out) == sorted([e["path"] for e in manifest["files"]] + ["manifest.json", "provenance.json"])
    before = file_entries(out)
    result = smoke.check(out, out.name, log=lambda message: None)  # a built artifact passes it too
    assert len(result["tokens"]) == smoke.NEW_TOKENS and isinstance(result["text"], str)
    assert file_entries(out) == before


def spoil_tokenizer(repo: Repo, model: str) -> None:
    """tokenizer.json no longer JSON, the model spec's digest pinned to the spoiled folder (as a
    `builder model add --force` of it would, before onboarding checked tokenizers)."""
    weights = repo.root / "weights" / model
    (weights / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    spec_file = repo.root / "specs" / "model" / f"{model}.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**spec, "digest": tree_digest(file_entries(weights))}, sort_keys=False))


def test_a_build_whose_tokenizer_cannot_be_read_fails_with_exit_1_and_publishes_nothing(repo):
    repo.add_model("tiny-llama", tokenizer=True)
    repo.run("build", "tiny-llama-fp8-dynamic", check=0)
    artifact = repo.root / "artifacts" / "tiny-llama-fp8-dynamic"
    before = file_entries(artifact)
    spoil_tokenizer(repo, "tiny-llama")
    result = repo.run("build", "tiny-llama-fp8-dynamic", check=1)
    assert "tiny-llama-fp8-dynamic/tokenizer.json: smoke.tokenizer:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert file_entries(artifact) == before  # the previous artifact, untouched
    assert sorted(p.name for p in (repo.root / "artifacts").iterdir()) == ["tiny-llama-fp8-dynamic",
                                                                           "tiny-llama-fp8-dynamic.buildinfo.json"]
    assert not list((repo.root / ".builder").glob("*.tmp-*"))  # no staging left behind


def test_logits_that_are_not_finite_fail_the_smoke_check_naming_the_weights(smoke_repo, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "dense"
    build.build(smoke_repo.root, "tiny-llama-dense", out=out, log=lambda message: None)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"][:] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match="dense/model.safetensors: smoke.generate: logits hold NaN or infinity "
                                          "at generated token 1 of"):
        smoke.check(out, "dense", log=lambda message: None)


def test_a_gguf_file_without_its_vocabulary_fails_naming_the_file(smoke_repo, tmp_path):
    out = tmp_path / "gguf"
    build.build(smoke_repo.root, "tiny-llama-gguf", out=out, log=lambda message: None)
    (gguf_file,) = out.glob("*.gguf")
    gguf_file.write_bytes(gguf_file.read_bytes()[:4096])  # truncated: the keys and tensors are gone
    before = files(out)
    with pytest.raises(CheckFailed, match=f"gguf/{gguf_file.name}: smoke.tokenizer: "):
        smoke.check(out, "gguf", log=lambda message: None)
    assert files(out) == before


def test_a_model_too_large_for_a_whole_model_load_is_skipped_and_says_so(tmp_path):
    """The check loads the whole model in FP32: above the bound it would set the build's peak memory."""
    said = []
    result = smoke.check(tmp_path, "huge", said.append, parameters=smoke.MAX_PARAMETERS + 1)
    assert result["skipped"] and "skipped" in said[0] and "builder eval" in said[0]
