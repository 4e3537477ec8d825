"""README.md: the artifact's model card (Hugging Face front matter, recipe, target, eval, serve, rebuild). Pure.

    builder build smollm2-135m-instruct-fp8-dynamic && cat artifacts/smollm2-135m-instruct-fp8-dynamic/README.md
"""

import json
import shlex

import yaml

from builder import formats
from builder.artifact.serve import serve_config
from builder.release import fused, memory
from builder.release.recipe import Args, Recipe
from builder.release.release import Release


def front_matter(spec: dict, recipe: Recipe) -> dict:
    """The Hugging Face model card metadata."""
    model = spec["model"]
    tags = {recipe.scheme_class, spec["choices"]["target"], spec["target"]["runtime"], "quant-release-builder"}
    if recipe.format != "dense":
        tags.add(recipe.format)
    matter = {"base_model": model["id"], "base_model_relation": "quantized",
              "library_name": formats.of(recipe.format).LIBRARY,  # the Hugging Face library that reads it
              "license": model["license"], "pipeline_tag": "text-generation", "tags": sorted(tags)}
    return matter


def args_text(args: Args | None) -> str:
    """compressed-tensors QuantizationArgs in a few words: fp8, channel, symmetric, dynamic scales."""
    return "none (kept in the output dtype)" if args is None else args.words()


def eval_rows(result, prefix: str = "") -> list:
    """(metric, value) rows of eval.json's numeric leaves, in key order."""
    if isinstance(result, dict):
        return [row for key in sorted(result) for row in eval_rows(result[key], f"{prefix}{key}.")]
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return [(prefix.rstrip("."), result)]
    return []


def table(header: tuple, rows: list) -> list:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def task_lines(tasks: dict) -> list:
    """eval.json's task results as a table (scores, recovery, gate), and the stack that measured them."""
    rows = [(f"{row['task']} ({row['num_fewshot']}-shot)", row["metric"], row["samples"], row["score"]["source"],
             row["score"]["artifact"], "undefined (source 0)" if row["recovery"] is None else row["recovery"],
             "none" if row["min_recovery"] is None else f">= {row['min_recovery']}",
             "passed" if row["passed"] else "failed") for row in tasks["results"]]
    stack = tasks["measured_with"]
    return ["", "### Task accuracy", "",
            *table(("task", "metric", "samples", "source", "this artifact", "recovery", "gate", "verdict"), rows),
            "", f"Recovery is this artifact's score over the source's. Both models measured the same way by "
                f"{stack['harness']} on {stack['runtime']}, {stack['device']}, {stack['dtype']}."]


def experts_row(arch: dict) -> list:
    """A mixture of experts' parameter counts: all of them, and those a token runs through."""
    moe = arch.get("moe")
    if not moe:
        return []
    counted = memory.parameters(arch)
    mtp = (f", {counted['mtp'] / 1e9:.3f} B of the total in multi-token-prediction layers (unquantized, for "
           "speculative decoding)") if counted.get("mtp") else ""
    return [("parameters", f"{counted['total'] / 1e9:.3f} B total, {counted['active'] / 1e9:.3f} B active "
                           f"(top-{moe['num_experts_per_tok']} of {moe['num_experts']} experts per token){mtp}")]


def vllm_names_lines(arch: dict, recipe: Recipe) -> list:
    """A warning for a release whose experts only vLLM reads (gpt-oss's, split under vLLM's names)."""
    if arch["class"] not in fused.VLLM_NAMES or not fused.split_on_write(arch["class"], recipe):
        return []
    return ["", "Its experts are stored one per expert under vLLM's own names (`mlp.experts.E.w13_weight_packed`, "
                "`w2_...`), which vLLM's loader reads; transformers' `from_pretrained` does not read them (it leaves "
                "the experts unset and says so), so load it in vLLM."]


def model_card(release: Release, evaluation: dict | None = None) -> str:
    """The card's text for a release; evaluation is eval.json's content when the build measured it."""
    spec, recipe = release.spec.data(), release.recipe
    scheme = recipe.scheme_class
    model, target, context = spec["model"], spec["target"], spec["context"]
    serve = serve_config(release)
    figures = memory.estimate(spec, recipe)
    device = target["device"].get("name") or target["device"]["kind"]
    revision = f" at revision `{model['revision']}`" if model.get("revision") else ""
    lines = ["---", yaml.safe_dump(front_matter(spec, recipe), sort_keys=True).rstrip(), "---", "",
             f"# {spec['release']['name']} {spec['release']['version']}", "",
             f"[{model['id']}](https://huggingface.co/{model['id']}){revision}, quantized as **{scheme}** "
             f"for {target['runtime']} on {device}, built by quant-release-builder from a declarative, "
             "locked spec: the same artifact_id always gives the same bytes.", "",
             "## Recipe", "",
             *table(("setting", "value"), [
                 ("quant recipe", f"`{spec['choices']['quant']}` ({recipe.format})"),
                 ("weights", args_text(recipe.weights)),
                 ("input activations", args_text(recipe.input_activations)),
                 ("quantized modules", ", ".join(recipe.targets) or "none"),
                 ("kept unquantized", ", ".join(recipe.ignore) or "none"),
                 ("output dtype", recipe.dtype),
                 ("KV cache dtype", figures["kv_cache_dtype"]),
                 ("source", f"`{model['source']['kind']}`, weights digest `{model['digest']}`"),
                 *experts_row(model["architecture"])]), "",
             "## Target", "",
             *table(("setting", "value"), [
                 ("runtime", f"{target['runtime']} `{target['runtime_versions']}`"),
                 ("device", f"{device} x {spec['parallelism']['tensor'] * spec['parallelism']['pipeline']}"
                            f" (of {target['device']['count']} per node)"),
                 ("tensor / pipeline parallel", f"{spec['parallelism']['tensor']} / {spec['parallelism']['pipeline']}"),
                 ("max model length", f"{context['max_model_len']} tokens"),
                 ("max concurrent sequences", context["max_num_seqs"]),
                 ("prefill chunk", f"{context['prefill_chunk_size']} tokens"),
                 ("prefill buckets (batch, seq)", json.dumps(context["buckets"]["prefill"])),
                 ("decode buckets (batch, seq)", json.dumps(context["buckets"]["decode"]))]), "",
             f"Memory per device (estimate): {memory.arithmetic(spec, figures)}.", "",
             "## Evaluation", ""]
    if evaluation:
        lines += table(("metric", "value"), eval_rows(evaluation))
        lines += task_lines(evaluation["tasks"]) if "tasks" in evaluation else []
    else:
        lines.append(f"Not measured at build time (eval: `{spec['choices']['eval']}`).")
    environment = " ".join(f"{k}={v}" for k, v in sorted(serve["environment"].items()))
    lines += ["", "## How to serve", "", "```bash", serve["command"], "```", "",
              f"The arguments are in `serve.json`{f' (environment: `{environment}`)' if environment else ''}.",
              *vllm_names_lines(model["architecture"], recipe),
              *([] if "try" not in serve else ["", "One greedy completion:", "", "```bash", serve["try"], "```"]),
              "", "## How to rebuild", "",
              f"artifact_id: `{release.artifact_id}`", "",
              f"From a checkout of the release repository whose `{release.lock_file}` holds this artifact_id:",
              "", "```bash",
              f"builder import {spec['choices']['model']}        # the pinned source weights",
              " ".join(["builder", "build", release.name, *map(shlex.quote, release.overrides)]),
              f"dvc repro build@{release.name}    # or through DVC",
              f"builder verify {serve['model']}", "```", "",
              "`manifest.json` lists every file with its sha256; `release.json` is the resolved spec."]
    return "\n".join(lines) + "\n"
