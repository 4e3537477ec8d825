"""Shared fixtures: a release repository in tmp_path with tiny random models made from configs."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from builder import determinism
from builder.canonical import file_entries, tree_digest

determinism.apply_environment()  # in-process builds use the CLI's pinned CPU math: torch is not imported yet

PROJECT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Hermetic runs: the builder's cache (and anything else that honours XDG) lives in a temporary
    folder for the whole session, inherited by every subprocess; the user's ~/.cache is never written."""
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="builder-tests-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.get("XDG_CACHE_HOME", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def environment_restored():
    """A test that runs the CLI in-process (cli.main turns library bars off through TQDM_DISABLE when
    stderr is not a terminal) leaves the next test the environment it found."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


# Tiny configs of the architectures we promise to handle; every divisibility the specs check holds.
TINY = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                       max_position_embeddings=2048, tie_word_embeddings=False)),
    "tiny-qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                       max_position_embeddings=2048, tie_word_embeddings=True)),
    "tiny-mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, vocab_size=256,
                                           max_position_embeddings=2048, tie_word_embeddings=False,
                                           sliding_window=None)),
}
# Every other family the builder supports (builder/release/families.py), the same small shape: sliding
# windows shorter than the calibration windows, and experts small enough for group-32 INT4.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048, pad_token_id=0)
FAMILIES = {
    "tiny-llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "tiny-qwen3": ("qwen3", dict(head_dim=16)),
    "tiny-phi3": ("phi3", dict()),
    "tiny-gemma": ("gemma", dict(head_dim=16)),
    "tiny-gemma2": ("gemma2", dict(head_dim=16, sliding_window=8)),
    "tiny-gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=8, sliding_window_pattern=2)),
    "tiny-mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         mlp_only_layers=[1], norm_topk_prob=True)),
    "tiny-olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64)),
}
# Families without a planned checkpoint (builder/release/families.py derives it from the model): the same
# small shape, sliding windows shorter than the calibration windows, experts small enough for group 32.
DERIVED = {
    "tiny-granite": ("granite", dict(head_dim=16, embedding_multiplier=2.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2, logits_scaling=4.0)),
    "tiny-olmo2": ("olmo2", dict()),
    "tiny-smollm3": ("smollm3", dict(no_rope_layer_interval=2)),
    "tiny-exaone4": ("exaone4", dict(sliding_window=8, sliding_window_pattern=2)),
    "tiny-cohere2": ("cohere2", dict(sliding_window=8, logit_scale=0.25,
                                     layer_types=["sliding_attention", "full_attention"])),
    "tiny-qwen2-moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64)),
    "tiny-ernie-moe": ("ernie4_5_moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=64)),
    "tiny-glm4-moe": ("glm4_moe", dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                       first_k_dense_replace=1, n_group=1, topk_group=1)),
    "tiny-deepseek-v3": ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                             first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32,
                                             kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16)),
    "tiny-qwen3-next": ("qwen3_next", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                           linear_value_head_dim=16,
                                           layer_types=["linear_attention", "full_attention"])),
    "tiny-minimax": ("minimax", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     layer_types=["linear_attention", "full_attention"])),
}
RECIPES = ("bf16", "fp8-dynamic")
# Kinds saved with their multi-token-prediction layer, as DeepSeek publishes it (transformers saves none).
MTP = {"tiny-deepseek-v3"}


def make_checkpoint(kind: str, path: Path, seed: int = 0) -> dict:
    """Save a randomly initialised BF16 model of a tiny config; returns its config.json as a dict."""
    import json

    import torch
    import transformers

    if kind in TINY:
        config_class, values = TINY[kind]
        config = getattr(transformers, config_class)(**values)
    else:
        model_type, extra = FAMILIES.get(kind) or DERIVED[kind]
        values = {**SHAPE, **extra}
        config = transformers.AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path)
    if kind in MTP:
        add_mtp_layer(path, config)
    make_tokenizer(values["vocab_size"]).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return json.loads((path / "config.json").read_text())


def add_mtp_layer(path: Path, config) -> None:
    """Append the multi-token-prediction layer DeepSeek-V3 publishes as model.layers.61 (here the layer after
    the last one): its own embedding, enorm, hnorm, eh_proj [H, 2H], a decoder layer shaped as the last
    (MoE) one, shared_head.norm and shared_head.head, random BF16 values, in the same safetensors file."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    last, mtp = f"model.layers.{config.num_hidden_layers - 1}.", f"model.layers.{config.num_hidden_layers}."
    hidden, vocab = config.hidden_size, config.vocab_size
    added = {mtp + name[len(last):]: tensor.shape for name, tensor in tensors.items() if name.startswith(last)}
    added.update({f"{mtp}embed_tokens.weight": (vocab, hidden), f"{mtp}enorm.weight": (hidden,),
                  f"{mtp}hnorm.weight": (hidden,), f"{mtp}eh_proj.weight": (hidden, 2 * hidden),
                  f"{mtp}shared_head.norm.weight": (hidden,), f"{mtp}shared_head.head.weight": (vocab, hidden)})
    generator = torch.Generator().manual_seed(61)
    for name in sorted(added):
        tensors[name] = (torch.randn(added[name], generator=generator) * 0.05).to(torch.bfloat16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer over vocab_size made-up words: enough to be saved, copied and loaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def model_spec(kind: str, config: dict, digest: str) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {"id": f"test/{kind}", "license": "apache-2.0", "source": {"kind": "local"},
            "path": f"weights/{kind}", "digest": digest,
            "architecture": {"class": config["architectures"][0], **{k: config[k] for k in keys}}}


def release_text(name: str, model: str, quant: str, target: str = "cpu") -> str:
    return (f"# @package _global_\ndefaults:\n  - override /model: {model}\n  - override /quant: {quant}\n"
            f"  - override /target: {target}\n\nrelease:\n  name: {name}\n  version: 0.0.1\n")


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with 256 ids (one per byte), so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=alphabet[0]).save_pretrained(path)


# A byte-level BPE over the printable bytes with a few English merges, 256 ids in all (the tiny configs'
# vocab_size), so that tiny models have a tokenizer llama.cpp's GGUF vocabulary can hold (it needs merges).
BPE_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("r", "e"), ("o", "n"), ("e", "r"),
              ("Ġ", "s"), ("a", "t"), ("Ġ", "o"), ("e", "n"), ("Ġ", "c"), ("i", "s"), ("o", "r"), ("e", "s"),
              ("Ġ", "w"), ("a", "n"), ("Ġ", "b"), ("e", "d"), ("Ġ", "f"), ("in", "g"), ("Ġ", "p"), ("o", "u"),
              ("a", "l"), ("a", "r"), ("Ġ", "in"), ("Ġ", "m"), ("i", "t"), ("Ġa", "n"))


def save_bpe_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with merges and one special token, in 256 ids: control bytes
    other than tab and newline are left out to make room."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    mapping = pre_tokenizers.ByteLevel.alphabet()
    dropped = {chr(c) for c in range(256) if c < 32 and c not in (9, 10) or c == 127}
    to_char = {byte: char for byte, char in zip(range(256), byte_level_chars())}
    kept = [to_char[b] for b in range(256) if chr(b) not in dropped]
    assert set(kept) <= set(mapping)
    vocab = {"<|endoftext|>": 0, **{char: i + 1 for i, char in enumerate(kept)}}
    for left, right in BPE_MERGES:
        vocab[left + right] = len(vocab)
    assert len(vocab) == 256, len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(BPE_MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(path)


def byte_level_chars() -> list:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer maps byte b to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def published_like(bf16: Path, folder: Path, tensors: dict, quantization_config: dict) -> Path:
    """folder = bf16's checkpoint with its weights replaced by tensors and config.json's quantization_config set
    (a checkpoint as it would be published quantized)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    for path in bf16.iterdir():
        if path.suffix != ".safetensors":
            shutil.copyfile(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}, indent=2))
    return folder


def flip_last_byte(path: Path) -> None:
    """Tamper with a file the smallest way: flip one bit of its last byte."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


class Repo:
    """A release repository in a temporary folder, with the project's specs and tiny models."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def fresh(cls, root: Path) -> "Repo":
        """A new repository at root holding copies of the shipped specs/ and data/."""
        shutil.copytree(PROJECT / "specs", root / "specs")
        shutil.copytree(PROJECT / "data", root / "data")  # the shipped releases' calibration/eval text
        return cls(root)

    def add_model(self, kind: str, seed: int = 0, tokenizer: bool | str = False, name: str | None = None) -> Path:
        """A tiny model of kind as specs/model/<name>.yaml (name: kind); tokenizer True saves the
        byte-level tokenizer, "bpe" the byte-level BPE with merges (what a GGUF vocabulary needs)."""
        name = name or kind
        weights = self.root / "weights" / name
        config = make_checkpoint(kind, weights, seed)
        if tokenizer == "bpe":
            save_bpe_tokenizer(weights)
        elif tokenizer:
            save_byte_tokenizer(weights)
        digest = tree_digest(file_entries(weights))
        spec = model_spec(name, config, digest)
        if kind in FAMILIES:  # the whole architecture block, as `builder model add` writes it
            from builder.source import load

            spec["architecture"] = load.architecture(weights)["facts"]
        (self.root / "specs" / "model" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        for recipe in RECIPES:
            release = f"{name}-{recipe}"
            (self.root / "specs" / "release" / f"{release}.yaml").write_text(release_text(release, name, recipe))
        return weights

    def onboard(self, kind: str, downloads: Path) -> None:
        """A tiny checkpoint of kind saved outside the repository (downloads/<kind>), with the byte-level
        tokenizer, onboarded by `builder model add`'s own code under the name kind."""
        from builder.source import onboard

        download = downloads / kind
        make_checkpoint(kind, download)
        save_byte_tokenizer(download)
        onboard.add_model(self.root, kind, download, log=lambda m: None)

    def run(self, *args, cwd=None, env=None, check=None):
        """Run the real `builder` command in this repository; returns the CompletedProcess."""
        environment = {**os.environ, "BUILDER_ROOT": "", "PYTHONPATH": str(PROJECT), **(env or {})}
        result = subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd or self.root,
                                env=environment, capture_output=True, text=True)
        if check is not None:
            assert result.returncode == check, result.stderr
        return result


@pytest.fixture
def repo(tmp_path) -> Repo:
    """A repository holding a copy of the shipped specs/ and data/ (no weights, no locks)."""
    return Repo.fresh(tmp_path / "repo")


@pytest.fixture(scope="session")
def calib_repo(tmp_path_factory) -> Repo:
    """A repository with data/ and a tiny Llama that has a tokenizer, for calibrated recipes and eval."""
    repo = Repo.fresh(tmp_path_factory.mktemp("calib") / "repo")
    root = repo.root
    repo.add_model("tiny-llama", tokenizer=True)
    for name, recipe, calibration in (("fp8-static", "fp8-static", "licenses"),
                                      ("w4a16-gptq", "w4a16-gptq", "licenses")):
        text = release_text(f"tiny-llama-{name}", "tiny-llama", recipe, "vllm-h100")
        text = text.replace("\n\nrelease:", f"\n  - override /calibration: {calibration}\n\nrelease:")
        (root / "specs" / "release" / f"tiny-llama-{name}.yaml").write_text(text)
    return repo


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Repo:
    """One shared repository with every tiny model imported (read-only for tests that share it)."""
    repo = Repo.fresh(tmp_path_factory.mktemp("tiny") / "repo")
    for kind in TINY:
        repo.add_model(kind)
    return repo


# --- Pipelines: real git + real DVC repositories holding a copy of the project's pipeline ---------

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
PIPELINE_FILES = (".dvcignore", ".gitignore", "dvc.yaml")
PIPELINE_RELEASES = ("tiny-llama-bf16", "tiny-llama-fp8-dynamic", "tiny-qwen2-fp8-dynamic")


class Pipeline(Repo):
    """A git + DVC repository with the project's dvc.yaml, builder/ and schemas/, and tiny models."""

    def environment(self) -> dict:
        # DVC runs `python -m builder` through the shell: this interpreter first on PATH; no
        # PYTHONPATH, so the repository's own copy of builder/ (cwd) is the one that runs.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BUILDER_ROOT")}
        return {**environment, **GIT_IDENTITY, "PATH": path, "DVC_NO_ANALYTICS": "1"}

    def sh(self, *args, cwd=None, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=cwd or self.root, env=self.environment(),
                                capture_output=True, text=True)
        if check:
            assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result

    def dvc(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.sh(sys.executable, "-m", "dvc", *args, **kwargs)

    def git(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.sh("git", *args, **kwargs)

    def repro(self, *args) -> set:
        """Run `dvc repro`; returns the names of the stages whose command ran."""
        return set(re.findall(r"Running stage '([^']+)'", self.dvc("repro", *args).stdout))

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)


def init_pipeline(root: Path, kinds: tuple, releases: tuple, tokenizer: bool | str = False) -> Pipeline:
    """specs/ with only the given tiny releases, the project's pipeline files, git + dvc initialised
    (tokenizer: as Repo.add_model's)."""
    shutil.copytree(PROJECT / "specs", root / "specs")
    for name in ("builder", "schemas"):
        shutil.copytree(PROJECT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PIPELINE_FILES:
        shutil.copy(PROJECT / name, root / name)
    pipeline = Pipeline(root)
    for kind in kinds:
        pipeline.add_model(kind, tokenizer=tokenizer)
    for release in (root / "specs" / "release").glob("*.yaml"):
        if release.stem not in releases:
            release.unlink()
    pipeline.git("init", "-q", "-b", "main")
    pipeline.dvc("init", "-q")
    shutil.copy(PROJECT / ".dvc" / "config", root / ".dvc" / "config")  # remote: <repo>/../dvc-remote
    return pipeline


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory) -> Pipeline:
    """A committed pipeline whose first `dvc repro` built every release (read-only: copy it to change)."""
    from builder.release import lock

    pipeline = init_pipeline(tmp_path_factory.mktemp("pipeline") / "repo", ("tiny-llama", "tiny-qwen2"),
                             PIPELINE_RELEASES)
    lock.write(pipeline.root)
    pipeline.dvc("add", "-q", "weights/tiny-llama", "weights/tiny-qwen2")  # local checkpoints
    pipeline.commit("releases")
    pipeline.first_repro = pipeline.repro()
    pipeline.commit("built")
    return pipeline


@pytest.fixture
def pipeline(built_pipeline, tmp_path) -> Pipeline:
    """A private copy of built_pipeline (git history, DVC cache, artifacts) to change."""
    root = tmp_path / "repo"
    shutil.copytree(built_pipeline.root, root, symlinks=True)
    return Pipeline(root)
