"""Calibrate layer by layer: the source model runs one decoder layer at a time (builder/quant/layerwise.py)
over the calibration tokens, and on each layer every step the recipe asks for observes it and
finishes it (builder/quant/step.py): activation and KV-cache maxima (statistics), SmoothQuant,
AWQ-style scaling, E[x²] (imatrix: the imatrix_mse observer's and llama.cpp's), GPTQ. Deterministic:
fixed batches, sums in batch order, max-abs statistics.

    builder build smollm2-135m-instruct-fp8-static   (calibrates when the recipe needs it)

Exact for every family: each layer gets the inputs the model's own forward gives it; tests hold the
maxima equal to a full-model forward with hooks. Adding an algorithm is one module with its Step and
one line in STEPS.
"""

from pathlib import Path

import torch

from builder.console import progress
from builder.formats import experts
from builder.quant import asymmetric, awq, gptq, imatrix, layerwise, quantize, smoothquant, statistics, step
from builder.quant.results import Calibration
from builder.release.recipe import Recipe
from builder.source import skeleton
from builder.source.inputs import BuildInputs
from builder.spill import Spill
from builder.tensorfile import reader

# Every calibration step, in the order they observe and finish a layer: SmoothQuant changes the layer
# before the others see it; AWQ rescales the Hessians and E[x²] sums before they are read; the cross sums
# of GPTQ's asymmetric calibration run the source model's stream beside; GPTQ last.
STEPS = (smoothquant.SMOOTHQUANT, statistics.ACTIVATIONS, statistics.KV_CACHE, gptq.HESSIAN, awq.AWQ,
         imatrix.MEAN_SQUARES, imatrix.IMPORTANCE, asymmetric.CROSS, gptq.GPTQ)


def plan(recipe: Recipe) -> tuple:
    """The steps a recipe runs on every layer, in STEPS' order: those its fields turn on (Step.when)
    and those they need."""
    wanted = {s.name for s in STEPS if step.runs(s, recipe)}
    wanted |= {need for s in STEPS if s.name in wanted for need in s.needs}
    return tuple(s for s in STEPS if s.name in wanted)


def calibrate(source: Path, tensors: dict, modules: dict, recipe: Recipe, ids: torch.Tensor, log=print,
              device: str = "cpu", spill: Spill | None = None) -> Calibration:
    """Statistics, folded factors and GPTQ weights for quantize.compute, from calibration token ids
    [samples, length]: every step of plan(recipe) on every decoder layer.

    Returns a Calibration (builder/quant/results.py): input_amax, kv_amax, gptq, imatrix, importance,
    smoothing, each empty where the recipe runs no step that fills it (imatrix: imatrix_mse observers,
    FP32 sums; importance: llama.cpp's imatrix recipes, FP64 sums), modules by their checkpoint names,
    on the CPU; results of a step under a key no field names go to other; gptq is the
    Spill when given one (GPTQ's results go to disk as each layer finishes). Only one decoder layer's
    weights and one set of hidden states (FP32, [samples, length, hidden]) are in memory at a time (two
    with GPTQ's asymmetric calibration: the source model's beside them).
    device: where the layers run (cpu, cuda): one layer's weights on it at a time; the hidden states
    too when they fit in half its free memory, else on the CPU, a batch at a time on the device.
    """
    steps, device = plan(recipe), torch.device(device)
    config, family, model = skeleton.build(source, attention=lambda family: layerwise.register(family.calibrate_with),
                                           split=True)  # Llama 4's fused experts one Linear per expert
    found = {key: spill if s.spilled and spill is not None else {} for s in STEPS for key in s.results}
    rewrites = any(s.rewrites for s in steps)
    stored = not any(step.folds(s) for s in steps)  # Linears kept as stored unless factors go into them
    # steps that change what the others observe (own_pass) first, each in a pass of its own; then
    # one pass for the rest, whose outputs go to the next layer unless a step rewrites the weights
    passes = [*(([s], False) for s in steps if s.own_pass), ([s for s in steps if not s.own_pass], not rewrites)]
    with reader(tensors) as whole:
        read = experts.sliced(whole, tensors)  # split experts' Linears sliced from their fused parameters
        beside = any(s.beside for s in steps)
        hidden, arguments = layerwise.first_inputs(model, config, read, ids, device, streams=2 if beside else 1)
        source = [batch.clone() for batch in hidden] if beside else None  # the source model's stream
        layers = model.model.layers
        for index in progress(range(len(layers)), desc="calibrate", unit="layer"):
            prefix, module = f"model.layers.{index}.", layers[index]
            layerwise.materialize(module, prefix, family, read, device, stored)
            layer = step.Layer(index, prefix, module, family, targeted(module, prefix, family, modules, recipe),
                               None, log)
            layer.run = lambda replace, beside=False, m=module, i=index, layer=layer: layerwise.run(
                m, i, hidden, arguments, replace, (source, lambda: layer.running(step.SOURCE)) if beside else None)
            for group, replace in passes:
                keep(found, index, one_pass(layer, group, recipe, replace))
            if rewrites:
                layer.run(True)  # the next layer sees this one's outputs as the steps left it (quantized)
            layerwise.release(module)  # free this layer's weights before the next is read
    log(f"calibrated {len(layers)} layers on {ids.shape[0]} x {ids.shape[1]} tokens")
    return Calibration.of(found)


def one_pass(layer: step.Layer, steps: list, recipe: Recipe, replace: bool) -> dict:
    """The steps observe the layer while its batches run once, then finish in order: their results,
    {result key: {name: value}}."""
    try:
        seen = {s.name: s.observe(layer, recipe) for s in steps}
        layer.run(replace, any(s.beside for s in steps))
    finally:
        layer.unhook()
    found = {}
    for s in steps:
        for key, results in s.finish(layer, recipe, seen).items():
            found.setdefault(key, {}).update(results)
    return found


def targeted(module: torch.nn.Module, prefix: str, family, modules: dict, recipe: Recipe) -> dict:
    """The layer's Linears the recipe quantizes (every expert of a MoE layer included), by checkpoint name."""
    found = {}
    for name, linear in module.named_modules():
        disk = skeleton.checkpoint_name(prefix + name, family)
        if isinstance(linear, torch.nn.Linear) and quantize.targeted(disk + ".weight", tuple(linear.weight.shape),
                                                                     modules, recipe):
            found[disk] = linear
    return found


def keep(found: dict, layer: int, results: dict) -> None:
    """One layer's results ({key: {name: value}}) on the CPU: spilled to disk where found holds a Spill
    (GPTQ's weights), else kept. Nothing of them stays referenced here (a loop variable in the walk
    would hold a layer's integers through the next layer's rounding)."""
    for key, values in results.items():
        store = found[key]
        if isinstance(store, Spill):
            store.put(layer, values)
        else:
            store.update(layerwise.on(torch.device("cpu"), values))


def for_build(recipe: Recipe, source: BuildInputs, log, dump: Path | None = None, device: str = "cpu",
              scratch: Path | None = None) -> Calibration | None:
    """Calibrate when the recipe needs it (Recipe.needs_calibration); None otherwise.

    source is build.prepare()'s result: its calibration_ids were drawn (and checked) before any write.
    scratch: a folder outside the artifact for GPTQ's per-layer results (the build removes it).
    """
    from builder import atomic
    from builder.canonical import pretty_json

    if source.calibration_ids is None:
        return None
    found = calibrate(source.path, source.tensors, source.modules, recipe, source.calibration_ids, log,
                      device, Spill(scratch) if scratch is not None else None)
    if dump is not None:
        atomic.write_text(Path(dump), pretty_json(maxima(found)))
    return found


def maxima(found: Calibration) -> dict:
    """Calibration maxima as plain numbers for a debug dump: {kind: {name: float}}."""
    return {kind: {name: float(value.reshape(-1)[0]) for name, value in sorted(values.items())}
            for kind, values in (("input_amax", found.input_amax), ("kv_amax", found.kv_amax))}
