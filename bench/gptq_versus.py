"""GPTQ on one Linear, ours against llm-compressor's, on the same seeded weight and Hessian: the part of a
calibrated build where the time goes (bench/gptq_profile.py), timed side by side when whole builds
cannot be (a loaded machine). Each tool runs in its own venv and process, as in bench/memory_scale.py.

    python bench/gptq_versus.py --llmc /work/venvs/llmc/bin/python [--shapes 2048x2048,5504x2048,2048x5504]
    python bench/gptq_versus.py --side ours|theirs ROWS COLUMNS     # one tool, one shape (what the above runs)

Both: group-128 symmetric INT4 (w4a16-gptq), block 128, dampening 0.01, static activation order; the
Hessian of 512 seeded random tokens; ours under the builder's pinned math settings, theirs as its
oneshot runs (torch's defaults). Prints seconds per shape and our time over theirs.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUP, TOKENS = 128, 512


def inputs(rows: int, columns: int) -> tuple:
    """The seeded weight [rows, columns] (N(0, 0.02)) and Hessian (x xᵀ of TOKENS random tokens)."""
    import torch

    generator = torch.Generator().manual_seed(rows * 100003 + columns)
    x = torch.randn(TOKENS, columns, generator=generator)
    return torch.randn(rows, columns, generator=generator) * 0.02, x.T @ x


def ours(rows: int, columns: int) -> float:
    sys.path.insert(0, str(ROOT))
    from builder import determinism

    determinism.apply_environment()
    import yaml

    from builder.quant import gptq
    from builder.release.recipe import Recipe

    determinism.apply_torch()
    recipe = Recipe.of(yaml.safe_load((ROOT / "specs" / "quant" / "w4a16-gptq.yaml").read_text()))
    weight, hessian = inputs(rows, columns)
    started = time.perf_counter()
    gptq.quantize(weight, hessian, recipe, "linear")
    return time.perf_counter() - started


def theirs(rows: int, columns: int) -> float:
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=GROUP, symmetric=True,
                            actorder="static")
    weight, hessian = inputs(rows, columns)
    started = time.perf_counter()
    groups = weight.reshape(rows, columns // GROUP, GROUP).abs().amax(-1)
    scale = (groups / 7.5).clamp(min=1e-8).to(torch.bfloat16)  # its minmax observer's scale, near enough:
    zero = torch.zeros_like(scale, dtype=torch.int8)          # the cost does not depend on the values
    quantize_weight(weight.unsqueeze(0), (hessian / TOKENS).unsqueeze(0), scale.unsqueeze(0), zero.unsqueeze(0),
                    None, args, blocksize=128, percdamp=0.01)
    return time.perf_counter() - started


def main() -> None:
    if sys.argv[1:2] == ["--side"]:
        side, rows, columns = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps({"seconds": round((ours if side == "ours" else theirs)(rows, columns), 2)}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc", default="/work/venvs/llmc/bin/python", help="llm-compressor's python")
    parser.add_argument("--shapes", default="2048x2048,5504x2048,2048x5504", help="ROWSxCOLUMNS, comma-separated")
    args = parser.parse_args()
    print("| rows x columns | ours (s) | llm-compressor (s) | ours / theirs |\n|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        rows, columns = shape.split("x")
        seconds = {}
        for side, python in (("ours", sys.executable), ("theirs", args.llmc)):
            done = subprocess.run([python, __file__, "--side", side, rows, columns], capture_output=True, text=True,
                                  check=True)
            seconds[side] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        print(f"| {rows} x {columns} | {seconds['ours']:.1f} | {seconds['theirs']:.1f} | "
              f"{seconds['ours'] / seconds['theirs']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
