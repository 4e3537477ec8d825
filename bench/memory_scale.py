"""Memory scale: peak RSS and wall time of builds of synthetic Llama checkpoints of growing size, ours
and llm-compressor's, against an I/O floor measured in the same run; as a table, JSON and a PNG plot.

    pip install -e ".[bench]"      # matplotlib, for --plot
    python bench/memory_scale.py [--sizes 2,8] [--recipes fp8-dynamic,w8a8-int8,w4a16]
        [--llmc /work/venvs/llmc/bin/python] [--llmc-max-gb 2] [--samples 4 --length 128]
        [--work DIR] [--keep] [--json rows.json] [--plot memory.png] [--layers N]
    python bench/memory_scale.py write OUT_DIR SIZE_GB [--seed 0] [--layers N]     # one checkpoint only
    python bench/memory_scale.py floor SOURCE_DIR OUT_DIR BYTES       # the I/O floor, alone

For each size (GB of BF16 weights): writes a seeded random Llama-shaped checkpoint tensor by tensor
(never the whole model in memory) into a fresh release repository, pins its digest, `builder lock`s one
release per recipe and runs `builder build` for each as a subprocess, each followed by the I/O floor
for as many output bytes as that build's weight files; then llm-compressor's oneshot on the same
checkpoint (and token windows, for calibrated recipes), up to --llmc-max-gb. Each process is measured
whole (wall time; peak RSS from GNU time, see compare.measured). Run from the repository root.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import CALIBRATED, MODEL, markdown, measured, theirs, windows  # noqa: E402  (llm-compressor side)

VOCAB = 49152                    # SmolLM2's, so its tokenizer files tokenize the calibration text
HIDDEN = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)  # widths to choose from, head_dim 64
HEAD_DIM = 64
MIN_LAYERS = 8
STD = 0.02                       # of the random weights (norms are ones)
SHARD_BYTES = 2_000_000_000      # largest safetensors shard of the synthetic checkpoint
CHUNK_ELEMENTS = 1 << 24         # random values drawn at a time (64 MB of float32)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RECIPES = ("fp8-dynamic", "w8a8-int8", "w4a16")
UNCALIBRATED = {"fp8-static": "fp8-dynamic", "w4a16-gptq": "w4a16"}  # calibrated recipe -> same format without
W4_GROUP = 128                     # the shipped w4a16 group size; it divides every hidden size above
TARGET_RSS_GB = 1.5
TARGET_FLOOR_RATIO = 1.5           # our wall time against the I/O floor's, at the largest size
FLOOR_CHUNK = 8 << 20              # bytes the floor reads (and writes) at a time
Output = namedtuple("Output", "name dtype shape")


def shape_for(size_gb: float, layers: int | None = None) -> dict:
    """A Llama config whose BF16 weights take about size_gb: the widest hidden size (head_dim 64, GQA 4:1,
    SwiGLU width ~8/3 hidden) whose embedding and lm_head take at most half the parameters and leave
    room for MIN_LAYERS layers or more; then as many layers as fit (or the first `layers` of them: the
    same widths, a shorter model, to measure a size's per-layer peak without building every layer)."""
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
    found = config(max(fitting, default=HIDDEN[0]))
    if layers is not None:
        found["num_hidden_layers"] = min(layers, found["num_hidden_layers"])
    return found


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


def write_checkpoint(out: Path, size_gb: float, seed: int = 0, layers: int | None = None) -> dict:
    """A seeded random Llama checkpoint of ~size_gb (BF16) with SmolLM2's tokenizer (its first `layers`
    decoder layers only, when given); returns its architecture."""
    import torch
    from transformers import LlamaConfig

    from builder import tensorfile
    from builder.artifact import shards

    arch = shape_for(size_gb, layers)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [Output(name, torch.bfloat16, shape) for name, shape in tensor_shapes(arch)]
    groups = shards.assign([[o] for o in outputs], SHARD_BYTES)
    names = shards.shard_names(len(groups))
    for group, file in zip(groups, names):
        header, entries = tensorfile.plan(group)  # the layout the product's own writer uses
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


def model_spec(model: str, config: dict, digest: str) -> dict:
    """specs/model/<model>.yaml for a local checkpoint: its pinned digest and declared architecture."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {"id": f"synthetic/{model}", "license": "apache-2.0", "source": {"kind": "local"},
            "path": f"weights/{model}", "digest": digest,
            "architecture": {"class": config["architectures"][0], **{key: config[key] for key in keys}}}


def release_text(name: str, model: str, recipe: str, samples: int, length: int) -> str:
    """specs/release/<name>.yaml on the H100 target (it runs every recipe's kernels); calibrated
    recipes read `samples` windows of `length` tokens of the licences text, no recipe evaluates."""
    calibration = "licenses" if recipe in CALIBRATED else "none"
    text = (f"# @package _global_\ndefaults:\n  - override /model: {model}\n  - override /quant: {recipe}\n"
            f"  - override /target: vllm-h100\n  - override /calibration: {calibration}\n"
            f"  - override /eval: none\n\nrelease:\n  name: {name}\n  version: 0.0.1\n")
    if calibration != "none":
        text += f"\ncalibration:\n  samples: {samples}\n  sequence_length: {length}\n"
    return text


def release_repo(root: Path, size_gb: float, recipes: tuple, samples: int, length: int,
                 layers: int | None = None) -> tuple:
    """A release repository (the shipped specs and data) with the synthetic model (its first `layers`
    layers, when given), pinned, and one release per recipe. Returns (model name, its config.json, the
    writer's measurement)."""
    import yaml

    from builder.canonical import file_entries, tree_digest

    shutil.copytree(ROOT / "specs", root / "specs")
    shutil.copytree(ROOT / "data", root / "data")  # the calibration text
    for shipped in (root / "specs" / "release").glob("*.yaml"):
        shipped.unlink()
    model = f"synthetic-llama-{size_gb:g}gb".replace(".", "p") + (f"-{layers}l" if layers is not None else "")
    weights = root / "weights" / model
    writer = measured([sys.executable, str(Path(__file__).resolve()), "write", str(weights), str(size_gb),
                       *(["--layers", str(layers)] if layers is not None else [])])
    config = json.loads((weights / "config.json").read_text())
    spec = model_spec(model, config, tree_digest(file_entries(weights)))
    (root / "specs" / "model" / f"{model}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for recipe in recipes:
        text = release_text(f"{model}-{recipe}", model, recipe, samples, length)
        (root / "specs" / "release" / f"{model}-{recipe}.yaml").write_text(text)
    measured([sys.executable, "-m", "builder", "lock"], env={"BUILDER_ROOT": str(root)})
    # untimed: the architecture check every build makes is remembered per config.json (builder.release.cache);
    # only a model's first build computes it (~3 s: transformers' model code), so no row pays it
    measured([sys.executable, "-c", "import sys, pathlib; from builder.source import load; "
              "load.architecture(pathlib.Path(sys.argv[1]))", str(weights)])
    return model, config, writer


def weight_files(folder: Path) -> list:
    return sorted(folder.glob("*.safetensors"))


def floor(source: Path, out: Path, count: int) -> None:
    """The I/O floor of a build: read every source weight file once, write `count` bytes (the
    artifact's weight bytes, taken from what was read, in proportion as reading goes) into one file,
    sha256 what is written, fsync it. One thread, no torch: what any build must at least do."""
    files = weight_files(source)
    total = sum(path.stat().st_size for path in files)
    digest, done, kept = hashlib.sha256(), 0, 0
    buffer = memoryview(bytearray(FLOOR_CHUNK))
    with open(out, "wb") as output:
        for path in files:
            with open(path, "rb", buffering=0) as handle:
                while size := handle.readinto(buffer):
                    done += size
                    part = buffer[: count * done // total - kept]
                    output.write(part)
                    digest.update(part)
                    kept += len(part)
        output.flush()
        os.fsync(output.fileno())
    print(f"{out.name}: {kept} bytes, sha256 {digest.hexdigest()}")


def settled(command: list, env: dict | None = None) -> dict:
    """compare.measured, after the disk has written back what earlier processes left dirty (os.sync,
    not timed): each process then pays for its own writes, whatever ran before it."""
    os.sync()
    return measured(command, env)


def measure_size(work: Path, size_gb: float, args) -> list:
    """Rows for one checkpoint size: the writer; per recipe our build and the floor right after it
    (same output bytes); llm-compressor's builds when the size is within --llmc-max-gb."""
    from safetensors.torch import save_file

    root = work / f"size-{size_gb:g}" / "repo"
    model, config, writer = release_repo(root, size_gb, args.recipes, args.samples, args.length, args.layers)
    source = root / "weights" / model
    params = sum(math.prod(shape) for _, shape in tensor_shapes(config))
    base = {"size_gb": size_gb, "calibration_tokens": args.samples * args.length, "weight_bytes": sum(p.stat().st_size for p in weight_files(source)),
            "params": params, "architecture": {k: config[k] for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")}}
    rows = [{**base, "tool": "synthetic writer", "recipe": "-", **writer}]
    print(json.dumps(rows[-1]), flush=True)
    for recipe in args.recipes:
        artifact = root / "artifacts" / f"{model}-{recipe}"
        result = settled([sys.executable, "-m", "builder", "build", f"{model}-{recipe}"],
                          env={"BUILDER_ROOT": str(root)})
        output_bytes = sum(p.stat().st_size for p in weight_files(artifact))
        rows.append({**base, "tool": "ours", "recipe": recipe, "output_bytes": output_bytes, **result})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(artifact)
        floor_file = root.parent / "floor.bin"
        result = settled([sys.executable, str(Path(__file__).resolve()), "floor", str(source), str(floor_file),
                           str(output_bytes)])
        floor_file.unlink()
        rows.append({**base, "tool": "I/O floor", "recipe": recipe, "output_bytes": output_bytes, **result})
        print(json.dumps(rows[-1]), flush=True)
    if args.llmc and size_gb <= args.llmc_max_gb:
        ids_file = root.parent / "calibration.safetensors"
        save_file({"input_ids": windows("calibration", "licenses", args.samples, args.length).contiguous()},
                  ids_file)
        for recipe in args.recipes:
            out = root.parent / f"llm-compressor-{recipe}"
            os.sync()
            result = theirs(args.llmc, recipe, ids_file, out, source=source, group_size=W4_GROUP)
            rows.append({**base, "tool": "llm-compressor", "recipe": recipe, **result})
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(root.parent)
    return rows


def ratio(rows: list, row: dict, tool: str, key: str = "seconds") -> str:
    """Our wall (or CPU) time over another tool's for the same size and recipe ('' when there is none)."""
    other = [r for r in rows if (r["tool"], r["size_gb"], r["recipe"]) == (tool, row["size_gb"], row["recipe"])]
    if row["tool"] != "ours" or not other or key not in row or key not in other[0]:
        return ""
    return f"{row[key] / other[0][key]:.2f}x"


def calibration_rate(rows: list, row: dict) -> str:
    """A calibrated build's extra wall time over its uncalibrated counterpart's (same tool and size:
    fp8-static against fp8-dynamic, w4a16-gptq against w4a16), in seconds per 1,000 calibration
    tokens per billion parameters ('' for the rest, or when the counterpart did not run)."""
    base = UNCALIBRATED.get(row["recipe"]) if row["tool"] in ("ours", "llm-compressor") else None
    other = [r for r in rows if (r["tool"], r["size_gb"], r["recipe"]) == (row["tool"], row["size_gb"], base)]
    if not other:
        return ""
    extra = row["seconds"] - other[0]["seconds"]
    return f"{extra / (row['calibration_tokens'] / 1000) / (row['params'] / 1e9):.1f}"


def table(rows: list) -> str:
    """Markdown: one line per size, tool and recipe; our wall time against the floor and llm-compressor."""
    return markdown(rows, (
        ("size (GB BF16)", "---:", lambda r: f"{r['weight_bytes'] / 1e9:.2f}"),
        ("params", "---:", lambda r: f"{r['params'] / 1e6:,.0f} M"),
        ("tool", "---", lambda r: r["tool"]), ("recipe", "---", lambda r: r["recipe"]),
        ("output (GB)", "---:", lambda r: f"{r['output_bytes'] / 1e9:.2f}" if "output_bytes" in r else ""),
        ("wall time (s)", "---:", lambda r: r["seconds"]),
        ("CPU (s)", "---:", lambda r: r.get("cpu_seconds", "")),
        ("peak RSS (GB)", "---:", lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}"),
        ("vs floor", "---:", lambda r: ratio(rows, r, "I/O floor")),
        ("vs llm-compressor", "---:", lambda r: ratio(rows, r, "llm-compressor")),
        ("vs llm-compressor (CPU)", "---:", lambda r: ratio(rows, r, "llm-compressor", "cpu_seconds")),
        ("calibration s / 1k tokens / B params", "---:", lambda r: calibration_rate(rows, r))))


def plot(rows: list, path: Path) -> None:
    """Peak RSS (top) and wall time (bottom) against checkpoint size, one column per recipe: ours,
    llm-compressor's and (wall time) the I/O floor, with the RSS target drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    recipes = sorted({r["recipe"] for r in rows if r["tool"] == "ours"})
    figure, axes = pyplot.subplots(2, len(recipes), figsize=(4.2 * len(recipes), 7), squeeze=False)
    styles = {"ours": "-", "llm-compressor": "--", "I/O floor": ":"}
    for column, recipe in enumerate(recipes):
        for line, (key, label, scale) in enumerate((("peak_rss_bytes", "peak RSS of the whole process (GB)", 1e9),
                                                    ("seconds", "wall time (s)", 1))):
            chart = axes[line][column]
            for tool, style in styles.items():
                points = sorted((r["weight_bytes"] / 1e9, r[key] / scale) for r in rows
                                if (r["tool"], r["recipe"]) == (tool, recipe))
                if points and not (tool == "I/O floor" and key == "peak_rss_bytes"):
                    chart.plot(*zip(*points), marker="o", linestyle=style, label=tool)
            if key == "peak_rss_bytes":
                chart.axhline(TARGET_RSS_GB, color="grey", linestyle="-.", label=f"target {TARGET_RSS_GB} GB")
                chart.set_title(recipe)
            chart.set_ylim(bottom=0)
            chart.set_xlabel("checkpoint size (GB of BF16 weights)")
            chart.set_ylabel(label)
            chart.grid(True, alpha=0.3)
            chart.legend(fontsize="small")
    figure.suptitle("Builds of synthetic Llama checkpoints (one run; wall times on a shared, loaded machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    pyplot.close(figure)


def main() -> None:
    if sys.argv[1:2] in (["write"], ["floor"]):
        parser = argparse.ArgumentParser(description="write one synthetic checkpoint, or run the I/O floor")
        parser.add_argument("command")
        parser.add_argument("source_or_out", type=Path)
        if sys.argv[1] == "write":
            parser.add_argument("size_gb", type=float)
            parser.add_argument("--seed", type=int, default=0)
            parser.add_argument("--layers", type=int, help="write only the first N decoder layers")
            args = parser.parse_args()
            write_checkpoint(args.source_or_out, args.size_gb, args.seed, args.layers)
        else:
            parser.add_argument("out", type=Path)
            parser.add_argument("bytes", type=int)
            args = parser.parse_args()
            floor(args.source_or_out, args.out, args.bytes)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,8", help="GB of BF16 weights, comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="shipped quant options, comma-separated")
    parser.add_argument("--llmc", default="/work/venvs/llmc/bin/python", help="llm-compressor's python; '' skips it")
    parser.add_argument("--llmc-max-gb", type=float, default=2.0, help="largest size to run llm-compressor on")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (calibrated recipes)")
    parser.add_argument("--length", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--work", type=Path, default=ROOT.parent / "scratch",
                        help="scratch folder (needs ~2x the largest size free)")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--layers", type=int, help="build only the first N decoder layers of each size "
                        "(same widths: a size's per-layer peak RSS, quickly)")
    args = parser.parse_args()
    args.recipes = tuple(args.recipes.split(","))
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
