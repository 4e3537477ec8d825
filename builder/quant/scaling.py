"""What SmoothQuant (builder/quant/smoothquant.py) and AWQ-style scaling (builder/quant/awq.py) share:
per-channel factors folded into a decoder layer's norms and the Linears reading them, so the layer
computes the same function with channels easier to quantize. The writer applies the same factors to
the tensors it reads (quantize.smoothed).

    readers = scaling.watch_norms(layer, on_output)     # before the layer's batches run
    factors = scaling.fold(layer, norm, scaling.read_by(readers)[norm], factor)
"""

import torch

from builder.quant.step import Layer
from builder.release import families

SMOOTHING_FLOOR = 1e-5  # smallest max |x|, max |w|, rms and factor used: no channel divides by zero


def fold(layer: Layer, norm: str, readers: list, factor: torch.Tensor) -> dict:
    """norm ÷ factor and its readers' weight columns × factor, in place (the layer's function is kept);
    {checkpoint tensor name: factor} for quantize.smoothed, one CPU copy shared by all of them."""
    modules = dict(layer.module.named_modules())
    modules[norm].weight.div_(factor)
    for reader in readers:
        modules[reader].weight.mul_(factor)
    kept = factor.cpu()
    return {layer.name(module) + ".weight": kept for module in (norm, *readers)}


def watch_norms(layer: Layer, on_output=None) -> dict:
    """Hooks that find, while the layer runs, which Linears read each norm of families.SMOOTHED_NORMS
    (by tensor identity) and hand each norm output to on_output(norm, output). Returns {norm: [Linear
    names in the layer, in the order they ran]}, filled as the layer runs (read it with read_by)."""
    norms = {name: getattr(layer.module, name) for name in families.SMOOTHED_NORMS}
    outputs, readers = {}, {name: [] for name in norms}

    def on_norm(name):
        def hook(module, args, output):
            outputs[name] = output
            if on_output is not None:
                on_output(name, output)
        return hook

    def on_linear(linear):
        def hook(module, args):
            for name, output in outputs.items():
                if args[0] is output and linear not in readers[name]:
                    readers[name].append(linear)
        return hook

    for name, norm in norms.items():
        layer.on_output(norm, on_norm(name))
    for name, module in layer.module.named_modules():
        if isinstance(module, torch.nn.Linear):
            layer.on_input(module, on_linear(name))
    layer.removers.append(outputs.clear)  # the last batch's norm outputs
    return readers


def read_by(readers: dict) -> dict:
    """watch_norms' readers after the layer ran; every norm must have one (smoothable() families do)."""
    for name, found in readers.items():
        if not found:
            raise RuntimeError(f"{name}: no Linear reads its output")
    return readers
