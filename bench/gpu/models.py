"""Seeded synthetic checkpoints and the release repository the GPU kit builds them in.

    python bench/gpu/models.py repo WORK/repo --device cuda|cpu     # checkpoints, specs, data; prints JSON
    python bench/gpu/models.py windows WORK/repo MODEL SAMPLES LENGTH OUT.safetensors

`repo` writes, into a fresh release repository (the project's specs/ groups and data/, no shipped
release): each model of SHAPES[device] as random BF16 weights (torch seeded, transformers' own
initialisation) with a 256-id byte-level tokenizer, its specs/model/<name>.yaml with the pinned digest,
and one specs/release/<name>-<recipe>.yaml per recipe of RECIPES on the H100 target, calibrated on the
shipped licences text (calibration: licenses; samples, length and device are overridden per build).
`windows` saves the token ids the builder draws for those releases, for llm-compressor's side.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RECIPES = ("w4a16-gptq", "fp8-static")  # shipped specs/quant options, both calibrated
SEED = 0
# An 8B Llama's decoder layer (Llama-3-8B: hidden 4096, SwiGLU 14336, 32 heads, 8 KV heads of 128),
# with few layers so that four builds and llm-compressor's fit ten minutes of one H100; and a small
# Llama with more layers (the whole path: embeddings, many layers, lm_head). On the CPU (dry run) the
# same proportions at widths two cores handle in seconds. Every in-feature count is a multiple of the
# w4a16 group size (128).
SHAPES = {
    "cuda": {
        "llama-8b-shaped": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                num_attention_heads=32, num_key_value_heads=8),
        "small-llama": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                            num_attention_heads=16, num_key_value_heads=4),
    },
    "cpu": {
        "llama-8b-shaped": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2),
        "small-llama": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2),
    },
}
COMMON = dict(vocab_size=256, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)
SPEC_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def save_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with 256 ids (one per byte, no merges): reads any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=alphabet[0]).save_pretrained(path)


def write_checkpoint(path: Path, shape: dict, seed: int = SEED) -> dict:
    """A randomly initialised BF16 Llama of shape (torch seeded), with the tokenizer; its config.json."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, **COMMON, head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    save_tokenizer(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return json.loads((path / "config.json").read_text())


def model_spec(name: str, config: dict, digest: str) -> dict:
    """specs/model/<name>.yaml for a local checkpoint: its pinned digest and declared architecture."""
    return {"id": f"synthetic/{name}", "license": "apache-2.0", "source": {"kind": "local"},
            "path": f"weights/{name}", "digest": digest,
            "architecture": {"class": config["architectures"][0], **{key: config[key] for key in SPEC_KEYS}}}


def release_text(name: str, model: str, recipe: str) -> str:
    """specs/release/<name>.yaml: recipe on the H100 target, calibrated on the licences text, no eval."""
    return (f"# @package _global_\ndefaults:\n  - override /model: {model}\n  - override /quant: {recipe}\n"
            f"  - override /target: vllm-h100\n  - override /calibration: licenses\n  - override /eval: none\n"
            f"\nrelease:\n  name: {name}\n  version: 0.0.1\n")


def make_repo(root: Path, device: str) -> dict:
    """The release repository at root; returns {model: {"layers", "releases", "weights"}}."""
    import yaml

    from builder.canonical import file_entries, tree_digest

    shutil.copytree(ROOT / "specs", root / "specs")
    shutil.copytree(ROOT / "data", root / "data", ignore=shutil.ignore_patterns("*.py"))
    for shipped in (root / "specs" / "release").glob("*.yaml"):
        shipped.unlink()
    made = {}
    for name, shape in SHAPES[device].items():
        weights = root / "weights" / name
        config = write_checkpoint(weights, shape)
        spec = model_spec(name, config, tree_digest(file_entries(weights)))
        (root / "specs" / "model" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        releases = {}
        for recipe in RECIPES:
            releases[recipe] = f"{name}-{recipe}"
            (root / "specs" / "release" / f"{name}-{recipe}.yaml").write_text(release_text(releases[recipe], name, recipe))
        made[name] = {"layers": config["num_hidden_layers"], "releases": releases, "weights": str(weights),
                      "params": sum(p.stat().st_size for p in weights.glob("*.safetensors")) // 2}
    return made


def save_windows(root: Path, model: str, samples: int, length: int, out: Path) -> None:
    """The calibration token ids the builder draws for model's releases (shipped licenses option,
    resized), as {"input_ids": [samples, length]} in a safetensors file."""
    import yaml
    from safetensors.torch import save_file

    from builder.source import data

    spec = {**yaml.safe_load((root / "specs" / "calibration" / "licenses.yaml").read_text()),
            "samples": samples, "sequence_length": length}
    ids = data.samples(root, spec, root / "weights" / model, file="specs/calibration/licenses.yaml",
                       group="calibration")
    save_file({"input_ids": ids.contiguous()}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    repo = sub.add_parser("repo")
    repo.add_argument("root", type=Path)
    repo.add_argument("--device", choices=sorted(SHAPES), required=True)
    windows = sub.add_parser("windows")
    windows.add_argument("root", type=Path)
    windows.add_argument("model")
    windows.add_argument("samples", type=int)
    windows.add_argument("length", type=int)
    windows.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "repo":
        print(json.dumps(make_repo(args.root, args.device)))
    else:
        save_windows(args.root, args.model, args.samples, args.length, args.out)


if __name__ == "__main__":
    main()
