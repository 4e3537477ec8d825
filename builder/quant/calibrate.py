"""Calibrate layer by layer: the source model runs one decoder layer at a time (FP32, CPU) over the
calibration tokens, recording max |input| of every targeted Linear (every expert of a MoE layer
included), max |key| and |value| entering the KV cache, and (for GPTQ) each Linear's input second
moments, (for imatrix) their diagonal; with SmoothQuant or AWQ-style scaling, each layer's
per-channel factors folded into its norms (builder/quant/scaling.py). Deterministic: fixed batches, max-abs statistics.

    builder build smollm2-135m-instruct-fp8-static   (calibrates when the recipe needs it)

Exact for every family: each layer gets the inputs the model's own forward gives it (embedding scale,
per-layer-type rotary embeddings, sliding-window masks), recorded by running that forward with
stand-ins for the layers; tests hold the maxima equal to a full-model forward with hooks.
"""

from pathlib import Path

import torch

from builder.console import progress
from builder.quant import gptq, quantize, scaling
from builder.spill import Spill
from builder.source import skeleton
from builder.release.recipe import Recipe
from builder.tensorfile import reader

BATCH = 4  # calibration samples per forward pass: fixed, so every reduction splits the same way
KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale")  # where compressed-tensors and vLLM look for them


def observed(attend):
    """An attention function that hands key and value (post-RoPE, as they enter the KV cache) to
    module.builder_observe first, then attends as the model's own kernel does."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        observe = getattr(module, "builder_observe", None)
        if observe is not None:
            observe(key, value)
        return attend(module, query, key, value, attention_mask, **kwargs)
    return attention


def register(kind: str) -> str:
    """Register the observing attention (and its mask function: without one transformers builds no
    mask at all, so sliding windows would be ignored) under a name of our own; returns the name."""
    import importlib

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    if kind == "eager":  # Gemma 2: sdpa would drop the attention logits' softcapping
        attend = importlib.import_module("transformers.models.gemma2.modeling_gemma2").eager_attention_forward
        mask = eager_mask
    else:
        attend = importlib.import_module("transformers.integrations.sdpa_attention").sdpa_attention_forward
        mask = sdpa_mask
    name = f"builder_observed_{kind}"
    AttentionInterface.register(name, observed(attend))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


class Stop(Exception):
    """Raised by the last stand-in layer: nothing after the decoder layers is needed."""


class StandIn(torch.nn.Module):
    """Takes a decoder layer's place while the model's own forward runs: records what the layer is
    called with and passes the hidden states on (masks and rotary inputs do not depend on them)."""

    def __init__(self, calls: list, last: bool, layer: torch.nn.Module):
        super().__init__()
        self.calls, self.last = calls, last
        self.attention_type = getattr(layer, "attention_type", None)  # some forwards pick masks by it

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise Stop
        return hidden_states


def layer_inputs(model, ids: torch.Tensor, every_layer: bool) -> list:
    """[(hidden states entering layer 0, args, kwargs)] per layer (or only layer 0) for a batch of
    token ids, as the model's own forward computes them (only its embedding holds real weights)."""
    body, calls = model.model, []
    layers = body.layers
    count = len(layers) if every_layer else 1
    body.layers = torch.nn.ModuleList([StandIn(calls, i == count - 1, layer) for i, layer in enumerate(layers)])
    try:
        with torch.no_grad():
            body(input_ids=ids, use_cache=False)
    except Stop:
        pass
    finally:
        body.layers = layers
    return calls


def prepare_model_inputs(model, config, read, rows: torch.Tensor) -> None:
    """Give the embedding FP32 weights for the token ids calibration uses (rows, sorted; the ids are
    passed as their index into rows) and the model-level modules their CPU buffers. Its own forward
    then gives the very values the whole table would (Gemma 3's scale included), but holds kilobytes,
    not the table in FP32 (0.8 GB for a 49k x 4096 vocabulary) next to the BF16 one read."""
    embedding = model.model.embed_tokens
    embedding.to_empty(device="cpu")
    with torch.no_grad():
        embedding.weight = torch.nn.Parameter(read("model.embed_tokens.weight")[rows].to(torch.float32),
                                              requires_grad=False)
    if hasattr(embedding, "scalar_embed_scale"):  # Gemma's √hidden: a non-persistent buffer, lost on meta
        embedding.embed_scale = torch.tensor(embedding.scalar_embed_scale)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq buffers, on CPU


def materialize(module: torch.nn.Module, prefix: str, family, read, device=torch.device("cpu")) -> None:
    """Give a meta module real FP32 weights read from the checkpoint (names under prefix), one tensor
    at a time: reading the whole layer first would hold it twice (BF16 as read, FP32 in place)."""
    module.to_empty(device=device)
    module.to(torch.float32)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            disk = skeleton.checkpoint_name(prefix + name, family)
            value = read(disk)
            quantize.require_finite(disk, value)
            tensor.copy_(value)


def calibrate(source: Path, tensors: dict, modules: dict, recipe: Recipe, ids: torch.Tensor, log=print,
              device: str = "cpu", spill: Spill | None = None) -> dict:
    """Statistics and GPTQ weights for quantize.compute, from calibration token ids [samples, length].

    Returns {"input_amax": {module: [1]}, "kv_amax": {kv scale name: [1]}, "gptq": {module: (values, scale)},
    "imatrix": {module: E[x²] per input column}, "importance": {module: E[x^2] per input feature, FP32},
    "smoothing": {checkpoint tensor: SmoothQuant's or AWQ's factor per input channel} (see
    builder.quant.scaling)}
    (gptq a Spill when given one: GPTQ's results go to disk as each layer finishes; imatrix filled only
    for imatrix_mse observers (FP32 sums, shared by Linears reading one input), importance only for
    llama.cpp's imatrix recipes (FP64 sums per Linear)), modules by their checkpoint names,
    statistics on the CPU. Only one decoder layer's weights and one set of hidden states
    (FP32, [samples, length, hidden]) are in memory at a time: each batch's outputs replace its inputs.
    device: where the layers run (cpu, cuda): one layer's weights on it at a time; the hidden states
    too when they fit in half its free memory, else on the CPU, a batch at a time on the device.
    """
    config, family, model = skeleton.build(source, attention=lambda family: register(family.calibrate_with))
    device = torch.device(device)
    found = {"input_amax": {}, "kv_amax": {}, "gptq": spill if spill is not None else {}, "imatrix": {},
             "importance": {}, "smoothing": {}}
    with reader(tensors) as read:
        rows, indices = torch.unique(ids, sorted=True, return_inverse=True)
        prepare_model_inputs(model, config, read, rows)
        storage = hidden_states_device(device, ids, config.hidden_size)
        hidden, arguments = [], {}  # arguments per batch size: each layer's (args, kwargs), on the device
        for batch in indices.split(BATCH):
            calls = layer_inputs(model, batch, every_layer=len(batch) not in arguments)
            hidden.append(calls[0][0].to(storage))
            arguments.setdefault(len(batch), [on(device, (a, k)) for _, a, k in calls])
        model.model.embed_tokens.to_empty(device="meta")  # needed for layer 0's inputs only
        layers = model.model.layers
        for index in progress(range(len(layers)), desc="calibrate", unit="layer"):
            prefix = f"model.layers.{index}."
            layer = layers[index]
            materialize(layer, prefix, family, read, device)
            linears = {skeleton.checkpoint_name(prefix + name, family): module for name, module in layer.named_modules()
                       if isinstance(module, torch.nn.Linear) and quantize.targeted(
                           skeleton.checkpoint_name(prefix + name, family) + ".weight", tuple(module.weight.shape),
                           modules, recipe)}
            if recipe.smoothing is not None:
                found["smoothing"].update(scaling.smooth(
                    layer, prefix, family, lambda: run(layer, index, hidden, arguments, replace=False), recipe.smoothing))
            gptq_layer = recipe.algorithm == "gptq"
            stats = observe(layer, prefix, linears, recipe)
            watched = scaling.watch_norms(layer) if recipe.awq is not None else None
            run(layer, index, hidden, arguments, replace=not gptq_layer)
            for undo in stats.pop("undo"):
                undo()
            fill_unseen(linears, stats, prefix, recipe, log)
            if watched is not None:
                found["smoothing"].update(scaling.scale_activations(layer, prefix, family, watched(), stats, recipe))
            found["input_amax"].update({name: amax.cpu() for name, amax in stats["input_amax"].items()})
            found["kv_amax"].update({name: amax.cpu() for name, amax in stats["kv_amax"].items()})
            importance = {name: total / count for name, (total, count) in stats["imatrix"].items()}  # E[x²]
            found["imatrix"].update({name: mean.cpu() for name, mean in importance.items()})
            found["importance"].update({name: (total / stats["rows"][name]).to(torch.float32).cpu()
                                        for name, total in stats["squares"].items()})
            if gptq_layer:
                results = {}
                for name, module in linears.items():
                    if name not in stats["hessian"]:
                        continue  # an expert no token reached: round to nearest (fill_unseen said so)
                    values, scale = gptq.quantize(module.weight.data, stats["hessian"][name], recipe, name,
                                                  importance.get(name))
                    results[name] = (values, scale)
                    module.weight.data = gptq.dequantize(values, scale, recipe.weights)
                del stats
                keep(found["gptq"], index, results)
                run(layer, index, hidden, arguments, replace=True)  # the next layer sees quantized outputs
            layer.to_empty(device="meta")  # free this layer's weights before the next is read
    log(f"calibrated {len(layers)} layers on {ids.shape[0]} x {ids.shape[1]} tokens")
    return found


def fill_unseen(linears: dict, stats: dict, prefix: str, recipe: Recipe, log) -> None:
    """Experts no calibration token was routed to: round to nearest (no Hessian), and, for static
    input scales, the largest input maximum the layer's other experts saw (vLLM keeps one input scale
    per MoE layer, their maximum, anyway)."""
    unseen = sorted(name for name in linears if name not in stats["input_amax"])
    if not unseen:
        return
    seen = [amax for name, amax in stats["input_amax"].items() if ".experts." in name]
    fallback = torch.stack(seen).amax(dim=0) if seen else None
    for name in unseen:
        if fallback is None:
            raise RuntimeError(f"{name}: no calibration input reached it")  # only experts can go unseen
        stats["input_amax"][name] = fallback
    log(f"{prefix[:-1]}: no calibration token reached {len(unseen)} expert weights ({', '.join(unseen[:3])}"
        f"{', ...' if len(unseen) > 3 else ''}): round to nearest"
        + (", input scale from the layer's other experts" if recipe.static_inputs else ""))


def observe(layer: torch.nn.Module, prefix: str, linears: dict, recipe: Recipe) -> dict:
    """Hooks that keep running maxima (and GPTQ's x xᵀ sums, imatrix_mse's x² sums per column) while
    the layer runs.

    Linears that read the same input tensor (q/k/v, gate/up, an expert's gate/up) share one x xᵀ sum
    and one x² sum: each is computed once.
    """
    stats = {"input_amax": {}, "kv_amax": {}, "hessian": {}, "imatrix": {}, "squares": {}, "rows": {}, "undo": []}
    keep_hessian = recipe.algorithm == "gptq" or recipe.awq is not None
    keep_imatrix = recipe.weights is not None and recipe.weights.observer == "imatrix_mse"
    keep_squares = recipe.algorithm == "imatrix"  # llama.cpp's imatrix: E[x_j^2] per input feature
    last = {"input": None, "owner": None}  # the input tensor seen last, and the Linear that summed it

    def on_input(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            amax = x.abs().amax().reshape(1)
            previous = stats["input_amax"].get(name)
            stats["input_amax"][name] = amax if previous is None else torch.maximum(previous, amax)
            if keep_squares:  # FP64 sums in fixed batch order: the same importance on every run
                squares = x.to(torch.float64).square().sum(dim=0)
                stats["squares"][name] = squares + stats["squares"].get(name, 0)
                stats["rows"][name] = stats["rows"].get(name, 0) + x.shape[0]
            if not (keep_hessian or keep_imatrix):
                return
            if args[0] is last["input"]:
                for kind in ("hessian", "imatrix"):
                    if last["owner"] in stats[kind]:
                        stats[kind][name] = stats[kind][last["owner"]]
                return
            last.update(input=args[0], owner=name)
            if keep_imatrix:  # [sum of x² per column (FP32, batches in order), tokens]: E[x²] = diag(H) / tokens
                total = stats["imatrix"].setdefault(name, [torch.zeros(x.shape[1], device=x.device), 0])
                total[0] += x.square().sum(dim=0)
                total[1] += x.shape[0]
            if not keep_hessian:
                return
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
        names = {kind: prefix + scale for kind, scale in zip(("key", "value"), KV_SCALES)}

        def on_kv(key, value):
            for kind, tensor in (("key", key), ("value", value)):
                amax = tensor.detach().abs().amax().to(torch.float32).reshape(1)
                previous = stats["kv_amax"].get(names[kind])
                stats["kv_amax"][names[kind]] = amax if previous is None else torch.maximum(previous, amax)

        attention.builder_observe = on_kv
        stats["undo"].append(lambda: delattr(attention, "builder_observe"))
    return stats


def run(layer: torch.nn.Module, index: int, hidden: list, arguments: dict, replace: bool) -> None:
    """Run decoder layer index over every batch of hidden states with the inputs the model gives it
    (on the layer's device); with replace, each batch's outputs take its inputs' place (where it was)."""
    device = next(layer.parameters()).device
    with torch.no_grad():
        for position, batch in enumerate(hidden):
            args, kwargs = arguments[len(batch)][index]
            result = layer(batch.to(device), *args, **kwargs)
            if replace:
                hidden[position] = (result[0] if isinstance(result, tuple) else result).to(batch.device)
            del result


def hidden_states_device(device: torch.device, ids: torch.Tensor, width: int) -> torch.device:
    """Where the hidden states live: on the device when they take at most half its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if ids.numel() * width * 4 <= free // 2 else torch.device("cpu")


def on(device: torch.device, value):
    """value with every tensor in it (through tuples, lists and dicts) moved to device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(on(device, item) for item in value)
    if isinstance(value, dict):
        return {key: on(device, item) for key, item in value.items()}
    return value


def keep(store, layer: int, results: dict) -> None:
    """GPTQ's results of one layer: spilled to disk (a Spill), or kept in memory (a dict, for tests)."""
    if isinstance(store, Spill):
        store.put(layer, results)
    else:
        store.update({name: (values.cpu(), scale.cpu()) for name, (values, scale) in results.items()})


def for_build(recipe: Recipe, source: dict, log, dump: Path | None = None, device: str = "cpu",
              scratch: Path | None = None) -> dict | None:
    """Calibrate when the recipe needs it (static scales, KV-cache scales, GPTQ); None otherwise.

    source is build.prepare()'s result: its calibration_ids were drawn (and checked) before any write.
    scratch: a folder outside the artifact for GPTQ's per-layer results (the build removes it).
    """
    from builder import atomic
    from builder.canonical import pretty_json

    if source["calibration_ids"] is None:
        return None
    found = calibrate(source["path"], source["tensors"], source["modules"], recipe, source["calibration_ids"], log,
                      device, Spill(scratch) if scratch is not None else None)
    if dump is not None:
        atomic.write_text(Path(dump), pretty_json(statistics(found)))
    return found


def statistics(found: dict) -> dict:
    """Calibration maxima as plain numbers for a debug dump: {kind: {name: float}}."""
    return {kind: {name: float(value.reshape(-1)[0]) for name, value in sorted(found[kind].items())}
            for kind in ("input_amax", "kv_amax")}
