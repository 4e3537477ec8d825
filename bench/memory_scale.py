"""Memory scale: peak RSS and wall time of FP8 builds of synthetic Llama checkpoints of growing size, ours
and llm-compressor's, as a table, JSON and a PNG plot.

    pip install -e ".[bench]"      # matplotlib, for --plot
    python bench/memory_scale.py [--sizes 0.5,1,2,4,8] [--llmc /work/venvs/llmc/bin/python] [--llmc-max-gb 4]
        [--samples 4 --length 128] [--work DIR] [--keep] [--json rows.json] [--plot memory.png]
    python bench/memory_scale.py write OUT_DIR SIZE_GB [--seed 0]     # one checkpoint only

For each size (GB of BF16 weights): writes a seeded random Llama-shaped checkpoint tensor by tensor
(never the whole model in memory) into a fresh release repository, pins its digest, `builder lock`s two
releases (fp8-dynamic, fp8-static calibrated on data/calibration.txt) and runs `builder build` for each as
a subprocess; then llm-compressor's oneshot on the same checkpoint and token windows, up to --llmc-max-gb.
Each process is measured whole (wall time; peak RSS from GNU time, see compare.measured). Run from the repository root.
"""

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from compare import MODEL, markdown, measured, theirs, windows  # noqa: E402  (the llm-compressor comparison's helpers)
from conftest import Repo, model_spec, release_text  # noqa: E402  (the tests' repository maker)

VOCAB = 49152                    # SmolLM2's, so its tokenizer files tokenize the calibration text
HIDDEN = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)  # widths to choose from, head_dim 64
HEAD_DIM = 64
MIN_LAYERS = 8
STD = 0.02                       # of the random weights (norms are ones)
SHARD_BYTES = 2_000_000_000      # largest safetensors shard of the synthetic checkpoint
CHUNK_ELEMENTS = 1 << 24         # random values drawn at a time (64 MB of float32)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RECIPES = ("fp8-dynamic", "fp8-static")
TARGET_RSS_GB = 1.5
Output = namedtuple("Output", "name dtype shape")


def shape_for(size_gb: float) -> dict:
    """A Llama config whose BF16 weights take about size_gb: the widest hidden size (head_dim 64, GQA 4:1,
    SwiGLU width ~8/3 hidden) whose embedding and lm_head take at most half the parameters and leave
    room for MIN_LAYERS layers or more; then as many layers as fit."""
    params = size_gb * 1e9 / 2

    def config(hidden: int) -> dict:
        intermediate = -(-hidden * 8 // 3 // 128) * 128
        heads = hidden // HEAD_DIM
        kv_heads = max(1, heads // 4) if heads % 4 == 0 else heads
        per_layer = 2 * hidden * (hidden + kv_heads * HEAD_DIM) + 3 * hidden * intermediate + 2 * hidden
        layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
        return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": HEAD_DIM,
                "vocab_size": VOCAB, "max_position_embeddings": 4096, "tie_word_embeddings": False}

    fitting = [h for h in HIDDEN if 2 * VOCAB * h <= params / 2 and config(h)["num_hidden_layers"] >= MIN_LAYERS]
    return config(max(fitting, default=HIDDEN[0]))


def tensor_shapes(arch: dict) -> list:
    """(name, shape) of every Llama weight, embeddings first, layer by layer, lm_head last."""
    h, i, q, kv = (arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"] * HEAD_DIM,
                   arch["num_key_value_heads"] * HEAD_DIM)
    found = [("model.embed_tokens.weight", (VOCAB, h))]
    for layer in range(arch["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        found += [(prefix + name, shape) for name, shape in (
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
            ("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, q)),
            ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i)))]
    return found + [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]


def write_random(handle, name: str, shape: tuple, seed: int) -> None:
    """Stream one BF16 tensor: ones for norms, else N(0, STD) drawn in fixed chunks from a generator
    seeded by (seed, name), so the bytes depend on neither tensor order nor anything else."""
    import torch

    if len(shape) == 1:
        handle.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy())
        return
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    rows, columns = shape
    step = max(1, CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        chunk = torch.randn((min(step, rows - start), columns), generator=generator).mul_(STD)
        handle.write(chunk.to(torch.bfloat16).view(torch.uint8).numpy())


def write_checkpoint(out: Path, size_gb: float, seed: int = 0) -> dict:
    """A seeded random Llama checkpoint of ~size_gb (BF16) with SmolLM2's tokenizer; returns its architecture."""
    import torch
    from transformers import LlamaConfig

    from builder.artifact import shards

    arch = shape_for(size_gb)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [Output(name, torch.bfloat16, shape) for name, shape in tensor_shapes(arch)]
    groups = shards.assign([[o] for o in outputs], SHARD_BYTES)
    names = shards.shard_names(len(groups))
    for group, file in zip(groups, names):
        header, entries = shards.plan(group)  # the layout the product's own streaming writer uses
        shapes = {o.name: o.shape for o in group}
        with open(out / file, "wb") as handle:
            handle.write(header)
            for entry in entries:
                write_random(handle, entry.name, shapes[entry.name], seed)
    if len(names) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(shards.index(groups, names), indent=2) + "\n")
    LlamaConfig(architectures=["LlamaForCausalLM"], dtype="bfloat16", rms_norm_eps=1e-5,
                **arch).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / "weights" / MODEL / name, out / name)
    return arch


def release_repo(root: Path, size_gb: float, samples: int, length: int) -> tuple:
    """A release repository (shipped specs and data) with the synthetic model, pinned, and two releases.

    Returns (model name, its config.json, the writer's measurement, bytes of its safetensors files).
    """
    import yaml

    from builder.canonical import file_entries, tree_digest

    Repo.fresh(root)
    for shipped in (root / "specs" / "release").glob("*.yaml"):
        shipped.unlink()
    model = f"synthetic-llama-{size_gb:g}gb".replace(".", "p")
    weights = root / "weights" / model
    writer = measured([sys.executable, str(Path(__file__).resolve()), "write", str(weights), str(size_gb)])
    config = json.loads((weights / "config.json").read_text())
    spec = model_spec(model, config, tree_digest(file_entries(weights)))
    spec["id"] = f"synthetic/{model}"
    spec["architecture"]["head_dim"] = config["head_dim"]
    (root / "specs" / "model" / f"{model}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    calibration = (f"  - override /calibration: licenses\n\ncalibration:\n  samples: {samples}\n"
                   f"  sequence_length: {length}\n\nrelease:")
    for recipe in RECIPES:  # the H100 target: it runs static FP8 activations (the cpu target refuses them)
        text = release_text(f"{model}-{recipe}", model, recipe, "vllm-h100")
        if recipe == "fp8-static":
            text = text.replace("\n\nrelease:", "\n" + calibration)
        (root / "specs" / "release" / f"{model}-{recipe}.yaml").write_text(text)
    measured([sys.executable, "-m", "builder", "lock"], env={"BUILDER_ROOT": str(root)})
    weight_bytes = sum(p.stat().st_size for p in weights.glob("*.safetensors"))
    return model, config, writer, weight_bytes


def measure_size(work: Path, size_gb: float, args) -> list:
    """Rows for one checkpoint size: the writer, our two builds, and llm-compressor's when it fits."""
    from safetensors.torch import save_file

    root = work / f"size-{size_gb:g}" / "repo"
    model, config, writer, weight_bytes = release_repo(root, size_gb, args.samples, args.length)
    arch = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads")}
    params = sum(math.prod(shape) for _, shape in tensor_shapes(config))
    base = {"size_gb": size_gb, "weight_bytes": weight_bytes, "params": params, "architecture": arch}
    rows = [{**base, "tool": "synthetic writer", "recipe": "-", **writer}]
    print(json.dumps(rows[-1]), flush=True)
    for recipe in RECIPES:
        result = measured([sys.executable, "-m", "builder", "build", f"{model}-{recipe}"],
                          env={"BUILDER_ROOT": str(root)})
        rows.append({**base, "tool": "ours", "recipe": recipe, **result})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(root / "artifacts" / f"{model}-{recipe}")
    if args.llmc and size_gb <= args.llmc_max_gb:
        ids_file = root.parent / "calibration.safetensors"
        save_file({"input_ids": windows("calibration", "licenses", args.samples, args.length).contiguous()},
                  ids_file)
        for recipe in RECIPES:
            out = root.parent / f"llm-compressor-{recipe}"
            result = theirs(args.llmc, recipe, ids_file, out, source=root / "weights" / model)
            rows.append({**base, "tool": "llm-compressor", "recipe": recipe, **result})
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(root.parent)
    return rows


def table(rows: list) -> str:
    """Markdown: one line per size, tool and recipe."""
    return markdown(rows, (
        ("size (GB BF16)", "---:", lambda r: f"{r['weight_bytes'] / 1e9:.2f}"),
        ("params", "---:", lambda r: f"{r['params'] / 1e6:,.0f} M"),
        ("tool", "---", lambda r: r["tool"]), ("recipe", "---", lambda r: r["recipe"]),
        ("wall time (s)", "---:", lambda r: r["seconds"]),
        ("peak RSS (GB)", "---:", lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}")))


def plot(rows: list, path: Path) -> None:
    """Peak RSS against checkpoint size, one line per (tool, recipe), and the 1.5 GB target."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    series = sorted({(r["tool"], r["recipe"]) for r in rows if r["tool"] != "synthetic writer"})
    for tool, recipe in series:
        points = sorted((r["weight_bytes"] / 1e9, r["peak_rss_bytes"] / 1e9) for r in rows
                        if (r["tool"], r["recipe"]) == (tool, recipe))
        axes.plot(*zip(*points), marker="o", linestyle="-" if tool == "ours" else "--", label=f"{tool} {recipe}")
    axes.axhline(TARGET_RSS_GB, color="grey", linestyle=":", label=f"target {TARGET_RSS_GB} GB")
    axes.set_ylim(bottom=0)
    axes.set_xlabel("checkpoint size (GB of BF16 weights)")
    axes.set_ylabel("peak RSS of the whole process (GB)")
    axes.set_title("FP8 builds of synthetic Llama checkpoints")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": None})
    pyplot.close(figure)


def main() -> None:
    if sys.argv[1:2] == ["write"]:
        parser = argparse.ArgumentParser(description="write one synthetic checkpoint")
        parser.add_argument("command")
        parser.add_argument("out", type=Path)
        parser.add_argument("size_gb", type=float)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args()
        write_checkpoint(args.out, args.size_gb, args.seed)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1,2,4,8", help="GB of BF16 weights, comma-separated")
    parser.add_argument("--llmc", default="/work/venvs/llmc/bin/python", help="llm-compressor's python; '' skips it")
    parser.add_argument("--llmc-max-gb", type=float, default=4.0, help="largest size to run llm-compressor on")
    parser.add_argument("--samples", type=int, default=4, help="fp8-static calibration windows")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--work", type=Path, default=ROOT.parent / "scratch",
                        help="scratch folder (needs ~2.5x the largest size free)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="memory-scale-", dir=args.work))
    for size in (float(s) for s in args.sizes.split(",")):
        rows.extend(measure_size(work, size, args))
        if args.json:  # after each size: a long run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    if not args.keep:
        work.rmdir()
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
