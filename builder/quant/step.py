"""What a calibration step is: a few plain functions run on each decoder layer (Step), what they see of
the layer (Layer), and the input sums several steps keep (shared_sums). calibrate.py walks the layers.

    seen = {step.name: step.observe(layer, recipe) for step in steps}   # hooks on the layer's modules
    layer.run(replace); layer.unhook()                                    # the layer's batches run once
    results = step.finish(layer, recipe, seen)                            # {result key: {name: value}}

No session object: a step's state is what its observe returned, handed to its own finish and to those
of the steps after it (`needs` names the steps whose state it reads), and dropped with the layer.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from builder.source import skeleton

# The streams of hidden states a layer runs: the calibration's (each layer's inputs from the layers before
# it as calibration left them: rounded), and beside it, where a step asks (Step.beside), the source model's.
CALIBRATION, SOURCE = "calibration", "source"
ANY = ...  # in Step.when: the recipe field holds any value but None


def nothing(*args) -> dict:
    """A step's observe or finish that has nothing to do."""
    return {}


@dataclass(frozen=True)
class Step:
    """One algorithm's part in calibrating a decoder layer.

    when: {recipe field (dotted): the value that turns the step on (ANY: set)}; empty: the step runs only
    when a step that runs names it in needs. observe(layer, recipe) registers hooks (Layer.on_input,
    on_output) and returns the state they fill; finish(layer, recipe, seen) runs after the layer's
    batches, seen mapping each step of the pass to its state, and returns {result key: {name: value}}
    (moved to the CPU by the walk). own_pass: it changes the layer the others observe (folds factors
    into it), so it observes and finishes in a pass of its own, first. rewrites: its finish changes the
    layer's outputs (rounds its weights), so the layer runs once more to hand them to the next layer.
    spilled: its results are a layer's weights, kept in the build's Spill when given one. beside: its
    observe also hooks the source model's stream (stream=SOURCE): in its pass each batch of the source
    model's hidden states runs through the layer, as the source's weights left it, before the same batch
    of the calibration's.
    """

    name: str
    results: tuple                 # the keys of calibrate()'s result it fills
    when: dict
    needs: tuple = ()
    observe: Callable = nothing
    finish: Callable = nothing
    own_pass: bool = False
    rewrites: bool = False
    spilled: bool = False
    beside: bool = False


def folds(step: Step) -> bool:
    """Whether the step multiplies factors into the layer's weights (SmoothQuant, AWQ: their
    "smoothing" results are those factors): the layer's Linears are then FP32 from the start, not
    kept in the checkpoint's dtype until each runs or is rounded (layerwise.materialize)."""
    return "smoothing" in step.results


def runs(step: Step, recipe) -> bool:
    """Whether the recipe's fields turn the step on (Step.when)."""
    for path, wanted in step.when.items():
        value = recipe
        for part in path.split("."):
            value = getattr(value, part, None)
        if (value is not None) if wanted is ANY else value == wanted:
            return True
    return False


@dataclass
class Layer:
    """One decoder layer as the steps see it: on its device, its targeted Linears by checkpoint name;
    run(replace, beside=False) runs it over every calibration batch in FP32 (with replace, its outputs
    become the next layer's inputs; with beside, each after the same batch of the source model's stream,
    whose outputs always become its next inputs). Weights are FP32, except plain Linears' when no step
    folds factors into them (folds): those keep the checkpoint's dtype and are widened as each Linear
    runs (layerwise.materialize); GPTQ reads them in FP32 with .to(torch.float32)."""

    index: int
    prefix: str                   # "model.layers.{index}."
    module: torch.nn.Module
    family: object
    linears: dict                 # checkpoint name -> targeted torch.nn.Linear
    run: Callable
    log: Callable
    removers: list = field(default_factory=list)
    stream: str = CALIBRATION     # the stream running now (hooks hear only their own)

    def name(self, module: str) -> str:
        """The checkpoint name of a module of this layer (named as in module.named_modules())."""
        return skeleton.checkpoint_name(self.prefix + module, self.family)

    def on_input(self, module: torch.nn.Module, hook, stream: str = CALIBRATION) -> None:
        """hook(module, args) before module runs on the stream's batches, until unhook()."""
        self.removers.append(module.register_forward_pre_hook(self.only(stream, hook)).remove)

    def on_output(self, module: torch.nn.Module, hook, stream: str = CALIBRATION) -> None:
        """hook(module, args, output) after module runs on the stream's batches, until unhook()."""
        self.removers.append(module.register_forward_hook(self.only(stream, hook)).remove)

    def only(self, stream: str, hook):
        """hook, called only while the layer runs the stream (else nothing happens)."""
        return lambda *args: hook(*args) if self.stream == stream else None

    @contextmanager
    def running(self, stream: str):
        """The layer runs the stream's batches inside."""
        self.stream = stream
        try:
            yield
        finally:
            self.stream = CALIBRATION

    def unhook(self) -> None:
        """Remove every hook and drop what the steps asked to drop (references to the last batch)."""
        while self.removers:
            self.removers.pop(0)()


def rows(args: tuple) -> torch.Tensor:
    """A Linear's input as [tokens, features], FP32."""
    return args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)


def means(sums: dict) -> dict:
    """{name: total / tokens (FP32)} from shared_sums' {name: [total, tokens]}, on their device."""
    return {name: (total / count).to(torch.float32) for name, (total, count) in sums.items()}


def shared_sums(layer: Layer, add) -> dict:
    """Running sums over the calibration tokens of each targeted Linear's input, kept while the layer
    runs: {name: [total, tokens]}, total = add(total or None, x [tokens, features] FP32), batches in
    order. Linears that read the same input tensor (q/k/v, gate/up, an expert's gate/up) share one
    entry (the same list): it is computed once."""
    sums, last = {}, {"input": None, "owner": None}  # the input tensor seen last, and the Linear that summed it

    def on_input(name):
        def hook(module, args):
            if args[0] is last["input"]:
                if last["owner"] in sums:
                    sums[name] = sums[last["owner"]]
                return
            last.update(input=args[0], owner=name)
            x = rows(args)
            entry = sums.setdefault(name, [None, 0])
            entry[0] = add(entry[0], x)
            entry[1] += x.shape[0]
        return hook

    for name, module in layer.linears.items():
        layer.on_input(module, on_input(name))
    layer.removers.append(last.clear)
    return sums
