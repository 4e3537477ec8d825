"""llama.cpp loads the SmolLM2 GGUF releases, generates greedily and scores the eval text: one table of
release, file bytes, bits per weight, perplexity in llama.cpp beside the build's eval.json, greedy text.

    python bench/llamacpp_check.py [ARTIFACT_DIR ...] [--llama PYTHON] [--windows N] [--json OUT]

Without artifacts it checks the four SmolLM2 GGUF releases (Q4_0, Q4_K_M, Q5_K_M, Q8_0) under artifacts/
(build them first: `python -m builder build smollm2-135m-instruct-gguf-q4_k_m`, ...). llama.cpp runs in its
own venv (bench/requirements-llamacpp.txt) through bench/ondevice_runtime.py; every artifact is scored on
the token ids its own eval group draws (specs/eval/docstrings.yaml: 32 windows of 512 tokens, tokenized
by the builder as at build time), each window from an empty cache, so llama.cpp's perplexity compares
with eval.json's (transformers reading the same file, FP32). Heavy (~1 min per release): run it alone.
"""

import argparse
import json
import math
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ondevice import PROMPTS, run  # noqa: E402  (the runtime runner the on-device checks share)

RELEASES = tuple(f"smollm2-135m-instruct-gguf-{kind}" for kind in ("q4_0", "q4_k_m", "q5_k_m", "q8_0"))
LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
EXPECTED_START = " Paris"  # the greedy completion of PROMPTS["completion"] the source model gives


def weights(path: Path) -> dict:
    """Bits per weight of the GGUF file's tensors (all of them, and the decoder Linears alone) and the
    count of each GGML type among the Linears, from gguf's reader."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    linears = [t for t in tensors if LINEAR.match(t.name)]

    def bits(chosen: list) -> float:
        return 8 * sum(int(t.n_bytes) for t in chosen) / sum(int(t.n_elements) for t in chosen)

    types = Counter(t.tensor_type.name for t in linears)
    return {"bpw_all": bits(tensors), "bpw_linear": bits(linears),
            "parameters": sum(int(t.n_elements) for t in tensors), "linear_types": dict(sorted(types.items()))}


def eval_windows(release: str) -> list:
    """The token ids the shipped release's eval group selects (the windows its build scores for eval.json),
    as lists; resolved once from specs/ (the four SmolLM2 GGUF releases share the eval group docstrings), so
    an artifact built with overrides (eval=none) is scored on the same windows."""
    from builder.release.resolve import resolve
    from builder.source import data

    spec = resolve(ROOT, release)
    ids = data.samples(ROOT, spec["eval"], ROOT / spec["model"]["path"],
                       file=f"specs/eval/{spec['choices']['eval']}.yaml", group="eval")
    return ids.tolist()


def check(python: str, artifact: Path, work: Path, windows: list) -> dict:
    """One row: the file's sizes, llama.cpp's load, greedy texts and perplexity on the windows, and
    eval.json's figures."""
    path = next(artifact.glob("*.gguf"))
    spec = json.loads((artifact / "release.json").read_text())
    row = {"release": artifact.name, "rounding": spec["quant"]["algorithm"], "file_bytes": path.stat().st_size,
           **weights(path)}
    recorded = json.loads((artifact / "eval.json").read_text()) if (artifact / "eval.json").is_file() else {}
    row["eval_json"] = {key: recorded.get(key) for key in ("perplexity", "perplexity_increase_pct", "mean_kl",
                                                           "windows", "sequence_length")}
    try:
        result = run(python, "llama", artifact, {"windows": windows, "prompts": PROMPTS}, work)
    except Exception as error:  # a file llama.cpp refuses is a row that says so; the other rows still run
        return {**row, "loads": False, "error": f"{type(error).__name__}: {error}"}
    completion = result.get("completion", {}).get("text", "")
    return {**row, "loads": True, "load_s": result["load_s"], "perplexity": result["perplexity"],
            "windows": len(windows), "window_tokens": len(windows[0]),
            "tokens": sum(w["tokens"] for w in result["windows"]),
            "completion": completion, "paris": completion.startswith(EXPECTED_START),
            "chat": result.get("chat", {}).get("text", ""), "runtime": result.get("runtime", {})}


def table(rows: list) -> str:
    """The Markdown table of the rows, then what the K-quants' perplexities say against Q4_0 and Q8_0."""
    lines = ["| artifact | rounding | file bytes | bpw (all tensors) | bpw (Linears) | Linear types | loads | "
             "perplexity (llama.cpp) | eval.json (transformers) | source | greedy \"The capital of France is\" |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for row in rows:
        recorded = row["eval_json"].get("perplexity") or {}
        types = ", ".join(f"{kind} {count}" for kind, count in row["linear_types"].items())
        text = row.get("completion", row.get("error", ""))
        lines.append(f"| {row['release']} | {row['rounding']} | {row['file_bytes']:,} | {row['bpw_all']:.3f} | "
                     f"{row['bpw_linear']:.3f} | {types} | {'yes' if row['loads'] else 'no'} | "
                     f"{row.get('perplexity', math.nan):.3f} | {recorded.get('artifact', math.nan):.3f} | "
                     f"{recorded.get('source', math.nan):.3f} | {text[:48]!r}{'…' if len(text) > 48 else ''} |")
    return "\n".join(lines + ["", *verdicts(rows)])


def verdicts(rows: list) -> list:
    """Whether each K-quant's llama.cpp perplexity lies between Q4_0's and Q8_0's, and whether its greedy
    text starts with " Paris", said in words."""
    found = {kind: row for row in rows if row.get("loads")
             for kind in re.findall(r"-(q4_0|q4_k_m|q5_k_m|q8_0)(?:-|$)", row["release"])}
    said = [f"{name}: greedy text starts with {EXPECTED_START!r}: {'yes' if row['paris'] else 'NO'}"
            for name, row in found.items()]
    if "q4_0" in found and "q8_0" in found:
        low, high = found["q8_0"]["perplexity"], found["q4_0"]["perplexity"]
        for name in ("q4_k_m", "q5_k_m"):
            if name in found:
                inside = low <= found[name]["perplexity"] <= high
                said.append(f"{name}: perplexity {found[name]['perplexity']:.3f} "
                            f"{'lies' if inside else 'does NOT lie'} between Q8_0's {low:.3f} and Q4_0's {high:.3f}")
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path, default=[ROOT / "artifacts" / name for name in RELEASES])
    parser.add_argument("--llama", default="/tmp/llamacpp/bin/python", help="python of llama-cpp-python's venv")
    parser.add_argument("--eval-release", default=RELEASES[0], help="the release whose eval windows are scored")
    parser.add_argument("--windows", type=int, default=None, help="score only the first N eval windows")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    missing = [str(a) for a in args.artifacts if not a.is_dir()]
    if missing:
        sys.exit(f"not built: {', '.join(missing)} (python -m builder build RELEASE)")
    windows = eval_windows(args.eval_release)[:args.windows]
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as work:
        rows = []
        for artifact in args.artifacts:
            rows.append(check(args.llama, artifact, Path(work), windows))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "runtime"}), file=sys.stderr, flush=True)
    runtime = next((row["runtime"] for row in rows if row.get("runtime")), {})
    print(f"llama.cpp: {json.dumps(runtime, sort_keys=True)}")
    first = rows[0]
    print(f"windows: {first.get('windows')} x {first.get('window_tokens')} tokens of the eval text "
          f"per release, {first.get('tokens')} scored\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
