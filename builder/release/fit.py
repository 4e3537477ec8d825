"""Whether a release can run where it is meant to: target kernels, parallel layout, context, memory. Pure.

    builder resolve smollm2-135m-instruct-fp8-dynamic target=vllm-a100    # exit 2: no FP8 activations
Each check returns (key path, message) pairs; builder/release/resolve.py names the file that set the key.
"""

import math
import re

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from builder.release import families, memory
from builder.release.recipe import Recipe, problems as recipe_problems

# How RoPE scaling changes the longest context (vLLM's rule): these types multiply a base length by
# `factor`; the others (default, llama3, longrope) already count it in max_position_embeddings.
ROPE_SCALED_BASE = {"linear": "max_position_embeddings", "dynamic": "max_position_embeddings",
                    "yarn": "original_max_position_embeddings"}
# The formats a target loads when its file does not list them: the Hugging Face safetensors layouts
# (every vLLM target reads these, and only these; gpt-oss's mxfp4 only for gpt-oss, which its format checks).
SAFETENSORS_FORMATS = ("dense", "compressed-tensors", "fp8", "mxfp4")
# Model dimensions tensor parallelism splits evenly across devices.
TP_DIVIDES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def position_limit(arch: dict) -> tuple:
    """(longest context in tokens, how it follows from the config)."""
    rope = arch.get("rope_parameters") or {"rope_type": "default"}
    base_key = ROPE_SCALED_BASE.get(rope["rope_type"])
    if base_key is None:
        return arch["max_position_embeddings"], f"max_position_embeddings {arch['max_position_embeddings']}"
    base = rope.get(base_key, arch["max_position_embeddings"])
    factor = rope.get("factor", 1)
    limit = int(base * factor)
    return limit, f"{base_key} {base} x RoPE {rope['rope_type']} factor {factor} = {limit}"


def context_problems(spec: dict) -> list:
    """Context length within the model's positions; prefill chunk and buckets within the context."""
    context = spec["context"]
    max_len, seqs, chunk = context["max_model_len"], context["max_num_seqs"], context["prefill_chunk_size"]
    limit, why = position_limit(spec["model"]["architecture"])
    found = []
    if max_len > limit:
        found.append((("context", "max_model_len"), f"{max_len} tokens exceeds the model's {why}; "
                      f"allowed: 1 to {limit}"))
    if chunk < seqs:  # vLLM's own rule: a scheduling step must fit one token of every sequence
        found.append((("context", "prefill_chunk_size"), f"{chunk} tokens is less than max_num_seqs {seqs}; "
                      f"allowed: {seqs} or more"))
    for phase in ("prefill", "decode"):
        found.extend(bucket_problems(phase, [tuple(b) for b in context["buckets"][phase]], seqs, max_len))
    return found


def bucket_problems(phase: str, buckets: list, max_batch: int, max_seq: int) -> list:
    """(batch, seq) buckets strictly increasing, each within max_num_seqs and max_model_len."""
    found = []
    for first, second in zip(buckets, buckets[1:]):
        if first >= second:
            found.append((("context", "buckets", phase), f"not sorted: {list(first)} comes before "
                          f"{list(second)}; list (batch, seq) pairs in increasing order, without repeats"))
            break
    for index, (batch, seq) in enumerate(buckets):
        key = ("context", "buckets", phase, str(index))
        if batch > max_batch:
            found.append((key, f"{[batch, seq]}: batch {batch} exceeds max_num_seqs {max_batch}"))
        if seq > max_seq:
            found.append((key, f"{[batch, seq]}: seq {seq} exceeds max_model_len {max_seq}"))
    return found


def parallelism_problems(spec: dict, recipe: Recipe) -> list:
    """Tensor parallelism splits heads, KV heads, MLP width and weight groups evenly; PP <= layers."""
    arch = spec["model"]["architecture"]
    tp, pp = spec["parallelism"]["tensor"], spec["parallelism"]["pipeline"]
    common = math.gcd(*(arch[key] for key in TP_DIVIDES))
    allowed = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    found = [(("parallelism", "tensor"), f"{tp} does not divide model {key} {arch[key]}; "
              f"allowed tensor degrees: {allowed}") for key in TP_DIVIDES if arch[key] % tp]
    moe = arch.get("moe")
    if moe and moe["expert_intermediate_size"] % tp:  # vLLM splits every expert along its width
        found.append((("parallelism", "tensor"), f"{tp} does not divide the experts' intermediate size "
                      f"{moe['expert_intermediate_size']}"))
    if pp > arch["num_hidden_layers"]:
        found.append((("parallelism", "pipeline"), f"{pp} exceeds the model's {arch['num_hidden_layers']} "
                      f"layers; allowed: 1 to {arch['num_hidden_layers']}"))
    found.extend(shard_group_problems(arch, recipe, tp))
    count = spec["target"]["device"]["count"]
    if tp * pp > count:
        found.append((("parallelism", "tensor"), f"tensor {tp} x pipeline {pp} = {tp * pp} devices, but the "
                      f"target has {count} per node"))
    return found


def grouped_layers(arch: dict, recipe: Recipe) -> list:
    """(layer path with * for layer and expert numbers, in_features) of every group-quantized Linear."""
    args = recipe.weights
    if args is None or args.strategy not in ("group", "tensor_group"):
        return []
    return sorted({(re.sub(r"\.experts\.\d+\.", ".experts.*.", re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", module)),
                    columns) for module, _, columns in memory.linear_layers(arch) if recipe.quantizes(module)})


def group_size_problems(arch: dict, recipe: Recipe) -> list:
    """Group sizes that do not divide a targeted layer's input features, naming the layer (and block sizes:
    block_shape_problems)."""
    size = recipe.weights.group_size if recipe.weights is not None else None
    return [(("quant", "weights", "group_size"), f"{size} does not divide the {columns} input features of "
             f"{name}; use a divisor of {columns}") for name, columns in grouped_layers(arch, recipe)
            if columns % size] + block_shape_problems(arch, recipe)


def block_shape_problems(arch: dict, recipe: Recipe) -> list:
    """Block-wise weights: input features in whole blocks (the run-time activation groups are as wide), and
    output features in whole blocks where vLLM fuses or splits them (all but the row-parallel layers:
    q/k/v, gate/up); vLLM's fp8 block loader refuses other shapes."""
    args = recipe.weights
    if args is None or args.strategy != "block" or args.block_structure is None:  # None: a recipe problem
        return []
    height, width = args.block_structure
    shapes = sorted({(re.sub(r"\.\d+\.", ".*.", module), rows, columns)
                     for module, rows, columns in memory.linear_layers(arch) if recipe.quantizes(module)})
    return [(("quant", "weights", "block_structure"), f"{args.block_structure} does not tile {name} "
             f"[{rows}, {columns}]: vLLM's block kernels need input features in whole blocks of {width} and, "
             f"for layers it fuses or splits by rows, output features in whole blocks of {height}; use "
             "another recipe for this model (fp8-dynamic) or ignore the layer")
            for name, rows, columns in shapes
            if columns % width or (rows % height and not name.endswith(families.ROW_PARALLEL))]


def shard_group_problems(arch: dict, recipe: Recipe, tp: int) -> list:
    """Row-parallel layers split their input features, so each shard must hold whole weight groups.

    Rule: (in_features / group_size) % tensor == 0 for o_proj and down_proj (every expert's down
    projection too) when they are group-quantized. A group size that does not divide in_features at all
    is a recipe problem (group_size_problems), not reported here.
    """
    found = []
    for name, columns in grouped_layers(arch, recipe) if tp > 1 else ():
        path = name.removeprefix("model.layers.*.")
        groups, rest = divmod(columns, recipe.weights.group_size)
        if path.endswith(families.ROW_PARALLEL) and not rest and groups % tp:
            found.append((("parallelism", "tensor"), f"{tp} does not divide the {groups} weight groups of "
                          f"{path} (in_features {columns} / group_size {recipe.weights.group_size}); row-parallel "
                          "layers need whole groups per shard"))
    return sorted(set(found))


def model_problems(spec: dict) -> list:
    """The architecture is one the builder supports, declared as its family needs it."""
    arch = spec["model"]["architecture"]
    family = families.of_class(arch["class"])
    if family is None or not family.planned and arch.get("checkpoint") is None:
        return [(("model", "architecture", "class"), f"{arch['class']} is not a supported architecture; "
                 "supported: a decoder-only *ForCausalLM onboarded by `builder model add` (which derives its "
                 f"checkpoint), or one of {families.supported()} (docs/models.md says how to add a family)")]
    found = []
    if family.planned and (family.moe is None) != (arch.get("moe") is None):
        found.append((("model", "architecture", "moe"), f"{arch['class']} is "
                      f"{'a mixture of experts: declare moe' if family.moe else 'dense: moe is not allowed'} "
                      "(builder model add writes it from config.json)"))
    if family.tied_only and not arch["tie_word_embeddings"] and spec["target"]["runtime"] == "vllm":
        found.append((("model", "architecture", "tie_word_embeddings"), f"false: vLLM loads {arch['class']} "
                      "only with a tied lm_head"))
    return found + families.layout_problems(arch, family, spec["quant"]["format"])


def scaling_family_problems(arch: dict, recipe: Recipe) -> list:
    """SmoothQuant or AWQ-style scaling asked of a family they cannot fold into (families.smoothable), and
    any other fact of the family a recipe needs and its row lacks (families.fact_problems)."""
    family = families.of_class(arch["class"])
    asked = [(key, name) for key, name, value in (("smoothing", "SmoothQuant", recipe.smoothing),
                                                 ("awq", "AWQ-style scaling", recipe.awq)) if value is not None]
    if not asked or families.smoothable(family):
        return families.fact_problems(arch, recipe)
    supported = ", ".join(f.model_type for f in families.FAMILIES.values() if families.smoothable(f))
    why = "experts" if family.moe or arch.get("moe") else "other norms" if family.planned or family.model_type \
        else "no row saying which norms absorb them (fact norms_absorb; docs/models.md says how to add it)"
    return [(("quant", key), f"{name} folds into two norms per layer that scale by their weight; "
             f"{arch['class']} has {why}: supported for {supported}")
            for key, name in asked] + families.fact_problems(arch, recipe)


def target_problems(spec: dict, recipe: Recipe, recipes: dict | None = None) -> list:
    """The target loads the recipe's format and runs its kernel family, activation scales and KV-cache
    dtype natively.

    recipes: the quant options (name -> Recipe) of specs/quant/; when given, a refusal names those
    the target takes, so its support matrix is in the message.
    """
    target = spec["target"]
    found = mismatches(target, recipe)
    if found and recipes is not None:
        takes = sorted(name for name, other in recipes.items()
                       if not recipe_problems(other) and not mismatches(target, other))
        suffix = f"; {spec['choices']['target']} takes the recipes: {', '.join(takes) or 'none shipped'}"
        found = [(key, message + suffix) for key, message in found]
    try:
        SpecifierSet(target["runtime_versions"])
    except InvalidSpecifier:
        found.append((("target", "runtime_versions"), f"{target['runtime_versions']!r} is not a PEP 440 "
                      "version range, e.g. '>=0.32.0,<0.33'"))
    return found


def mismatches(target: dict, recipe: Recipe) -> list:
    """Why a target cannot run a (consistent) recipe as declared, as (key path, message); [] if it can."""
    where = target["device"].get("name") or target["device"]["kind"]
    formats = target.get("formats", SAFETENSORS_FORMATS)
    if recipe.format not in formats:  # nothing else about the recipe matters to a runtime that cannot read it
        return [(("target", "formats"), f"{target['runtime']} does not load format {recipe.format}; "
                 f"it loads: {', '.join(formats)}")]
    found = []
    scheme = recipe.scheme_class
    if scheme not in target["schemes"]:
        found.append((("target", "schemes"), f"{where} does not run {scheme} (the quant recipe's kernel "
                      f"family) natively; it runs: {', '.join(target['schemes'])}"))
    acts = recipe.input_activations
    if acts is not None:
        kind = "dynamic" if acts.dynamic else "static"
        if kind not in target["activation_scales"]:
            found.append((("target", "activation_scales"), f"{where} does not run {kind} activation scales; "
                          f"allowed: {', '.join(target['activation_scales']) or 'none'}"))
    kv = recipe.kv_cache_dtype
    if kv not in target["kv_cache_dtypes"]:
        found.append((("target", "kv_cache_dtypes"), f"{where} has no {kv} KV cache (the quant recipe "
                      f"quantizes it); allowed: {', '.join(target['kv_cache_dtypes'])}"))
    return found


def memory_problems(spec: dict, recipe: Recipe) -> list:
    """Refuse a release whose per-device estimate exceeds the target's usable memory."""
    figures = memory.estimate(spec, recipe)
    if figures["per_device"] <= figures["usable_bytes"]:
        return []
    return [(("target", "device", "memory_bytes"), "the release does not fit: "
             f"{memory.arithmetic(spec, figures)}; raise parallelism, lower context.max_model_len or "
             "context.max_num_seqs, or choose a smaller recipe")]
