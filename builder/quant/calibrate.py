"""Calibrate layer by layer: the source model runs one decoder layer at a time (FP32, CPU) over the
calibration tokens, recording max |input| of every targeted Linear, max |key| and |value| entering the
KV cache, and (for GPTQ) each Linear's input second moments. Deterministic: fixed batches, max-abs.

    builder build smollm2-135m-instruct-fp8-static   (calibrates when the recipe needs it)
"""

from pathlib import Path

import torch

from builder.console import progress
from builder.quant import gptq, quantize
from builder.quant.quantize import KV_PROJECTIONS
from builder.spec.recipe import Args, Recipe
from builder.tensorfile import reader

BATCH = 4  # calibration samples per forward pass: fixed, so every reduction splits the same way
ATTENTION = "builder_observed_sdpa"  # sdpa, with keys and values shown to the layer's observer first


def observed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, after handing key and value (post-RoPE) to module.builder_observe."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observe = getattr(module, "builder_observe", None)
    if observe is not None:
        observe(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def skeleton(source: Path):
    """The model's modules on the meta device (no memory), with the observing attention."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

    AttentionInterface.register(ATTENTION, observed_sdpa)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, attn_implementation=ATTENTION)
    return config, model


def materialize(module: torch.nn.Module, prefix: str, read) -> None:
    """Give a meta module real FP32 weights read from the checkpoint (names under prefix), one tensor
    at a time: reading the whole layer first would hold it twice (BF16 as read, FP32 in place)."""
    module.to_empty(device="cpu")
    module.to(torch.float32)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            value = read(prefix + name)
            quantize.require_finite(prefix + name, value)
            tensor.copy_(value)


def calibrate(source: Path, tensors: dict, modules: dict, recipe: Recipe, ids: torch.Tensor, log=print) -> dict:
    """Statistics and GPTQ weights for quantize.compute, from calibration token ids [samples, length].

    Returns {"input_amax": {module: [1]}, "kv_amax": {kv scale name: [1]}, "gptq": {module: (ints, scale)}}.
    Only one decoder layer's weights and one set of hidden states (FP32, [samples, length, hidden])
    are in memory at a time: each batch's outputs replace its inputs.
    """
    config, model = skeleton(source)
    body = model.model
    found = {"input_amax": {}, "kv_amax": {}, "gptq": {}}
    with reader(tensors) as read:
        embedding = read("model.embed_tokens.weight")
        hidden = [torch.nn.functional.embedding(batch, embedding).to(torch.float32) for batch in ids.split(BATCH)]
        del embedding
        rotary = type(body.rotary_emb)(config=config)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.no_grad():
            cos_sin = rotary(hidden[0][:1], positions)
        for index in progress(range(len(body.layers)), desc="calibrate", unit="layer"):
            prefix = f"model.layers.{index}."
            layer = body.layers[index]
            materialize(layer, prefix, read)
            linears = {prefix + name: module for name, module in layer.named_modules()
                       if isinstance(module, torch.nn.Linear)
                       and quantize.targeted(prefix + name + ".weight", tuple(module.weight.shape), modules, recipe)}
            gptq_layer = recipe.algorithm == "gptq"
            stats = observe(layer, prefix, linears, recipe)
            run(layer, hidden, positions, cos_sin, replace=not gptq_layer)
            for undo in stats.pop("undo"):
                undo()
            found["input_amax"].update(stats["input_amax"])
            found["kv_amax"].update(stats["kv_amax"])
            if gptq_layer:
                for name, module in linears.items():
                    values, scale = gptq.quantize(module.weight.data, stats["hessian"][name], recipe, name)
                    found["gptq"][name] = (values, scale)
                    module.weight.data = dequantize(values, scale, recipe.weights)
                del stats
                run(layer, hidden, positions, cos_sin, replace=True)  # the next layer sees quantized outputs
            layer.to_empty(device="meta")  # free this layer's weights before the next is read
    log(f"calibrated {len(body.layers)} layers on {ids.shape[0]} x {ids.shape[1]} tokens")
    return found


def observe(layer: torch.nn.Module, prefix: str, linears: dict, recipe: Recipe) -> dict:
    """Hooks that keep running maxima (and GPTQ's x xᵀ sums) while the layer runs.

    Linears that read the same input tensor (q/k/v, gate/up) share one x xᵀ sum: it is computed once.
    """
    stats = {"input_amax": {}, "kv_amax": {}, "hessian": {}, "undo": []}
    keep_hessian = recipe.algorithm == "gptq"
    last = {"input": None, "owner": None}  # the input tensor seen last, and the Linear that summed it

    def on_input(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            amax = x.abs().amax().reshape(1)
            previous = stats["input_amax"].get(name)
            stats["input_amax"][name] = amax if previous is None else torch.maximum(previous, amax)
            if not keep_hessian:
                return
            if args[0] is last["input"]:
                stats["hessian"][name] = stats["hessian"][last["owner"]]
                return
            last.update(input=args[0], owner=name)
            if name in stats["hessian"]:
                stats["hessian"][name].addmm_(x.T, x)
            else:
                stats["hessian"][name] = x.T @ x
        return hook

    for name, module in linears.items():
        stats["undo"].append(module.register_forward_pre_hook(on_input(name)).remove)
    stats["undo"].append(lambda: last.clear())
    if recipe.kv_cache_scheme is not None:
        attention = layer.self_attn
        names = {kind: prefix + scale for kind, scale in zip(("key", "value"), KV_PROJECTIONS.values())}

        def on_kv(key, value):
            for kind, tensor in (("key", key), ("value", value)):
                amax = tensor.detach().abs().amax().to(torch.float32).reshape(1)
                previous = stats["kv_amax"].get(names[kind])
                stats["kv_amax"][names[kind]] = amax if previous is None else torch.maximum(previous, amax)

        attention.builder_observe = on_kv
        stats["undo"].append(lambda: delattr(attention, "builder_observe"))
    return stats


def run(layer: torch.nn.Module, hidden: list, positions: torch.Tensor, cos_sin: tuple, replace: bool) -> None:
    """Run the layer over every batch of hidden states (causal attention, no mask); with replace,
    each batch's outputs take its inputs' place."""
    with torch.no_grad():
        for index, batch in enumerate(hidden):
            result = layer(batch, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
            if replace:
                hidden[index] = result[0] if isinstance(result, tuple) else result
            del result


def dequantize(values: torch.Tensor, scale: torch.Tensor, args: Args) -> torch.Tensor:
    """values * scale in FP32, scales broadcast per tensor, channel or group."""
    return values.to(torch.float32) * gptq.expand(scale.to(torch.float32).reshape(-1, 1) if scale.dim() < 2
                                                  else scale.to(torch.float32), args, values.shape[1])


def for_build(recipe: Recipe, source: dict, log, dump: Path | None = None) -> dict | None:
    """Calibrate when the recipe needs it (static scales, KV-cache scales, GPTQ); None otherwise.

    source is build.prepare()'s result: its calibration_ids were drawn (and checked) before any write.
    """
    from builder import atomic
    from builder.canonical import pretty_json

    if source["calibration_ids"] is None:
        return None
    found = calibrate(source["path"], source["tensors"], source["modules"], recipe, source["calibration_ids"], log)
    if dump is not None:
        atomic.write_text(Path(dump), pretty_json(statistics(found)))
    return found


def statistics(found: dict) -> dict:
    """Calibration maxima as plain numbers for a debug dump: {kind: {name: float}}."""
    return {kind: {name: float(value.reshape(-1)[0]) for name, value in sorted(found[kind].items())}
            for kind in ("input_amax", "kv_amax")}
