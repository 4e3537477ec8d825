"""Experts transformers keeps fused on disk, written one Linear per expert under the names vLLM's loader
reads. Not a format: the compressed-tensors writer (formats/compressed_tensors.py), the writer's
targeting and calibration (quant/) ask it. The layouts are data (SPLIT), one row per fused experts module.

Llama 4 (transformers' Llama4TextExperts) stores `feed_forward.experts.gate_up_proj` [E, hidden, 2 x inter]
and `experts.down_proj` [E, inter, hidden]: each expert's weight with its input features first (x @ W),
gate the first half of gate_up's last dimension and up the second. Granite 4 (GraniteMoeHybridExperts)
stores `block_sparse_moe.input_linear.weight` [E, 2 x inter, hidden] and `output_linear.weight`
[E, hidden, inter]: each expert's weight as nn.Linear holds it ([out, in]), gate the first half of the
rows and up the second (transformers' forward chunks its output in two; vLLM's fused-layout loader
chunks dim 0 the same way, granitemoehybrid.py l. 530). Expert e's Linears, [out, in], go to
`{block}.experts.e.gate_proj`, `.up_proj`, `.down_proj` for both: what vLLM 0.32 maps per expert
(models/llama4.py load_weights l. 555-562; models/granitemoehybrid.py get_expert_mapping l. 409-433).
Splitting is slicing (and transposing): every value is the source's, exactly.

Loading such a compressed-tensors artifact in transformers 5.17: its quantizers replace Llama4TextExperts
by SequentialLlama4TextExperts, one Llama4TextMLP per expert (quantizers/base.py,
MODULES_TO_PATCH_FOR_QUANTIZATION), so Llama 4 loads as it is. Granite 4's conversion mapping only renames
the fused tensors (conversion_mapping.py "granitemoe"), so reading() adds, for the load only, the
per-expert converters transformers has for Mixtral (merge the experts, concatenate gate and up): its
compressed-tensors quantizer then dequantizes each expert (integrations/compressed_tensors.py
DecompressExperts) before they are stacked, as for every MoE family whose experts are per-expert on disk
(their activations are not fake-quantized in forward, and static input scales are not read). A BF16
artifact keeps the fused layout transformers' plain models read.
"""

import contextlib
from dataclasses import dataclass

NAMES = ("gate_proj", "up_proj", "down_proj")  # one expert's Linears as written (vLLM's checkpoint names)


@dataclass(frozen=True)
class Fused:
    """One fused experts parameter on disk."""

    suffix: str          # the end of its name, after the MoE block's path
    parts: tuple         # the Linears of one expert it holds, in order along its output features
    inputs_first: bool   # each expert's matrix [in, out] (x @ W: Llama 4), not nn.Linear's [out, in]


@dataclass(frozen=True)
class Layout:
    """transformers' fused experts module of one family, as a quantized build writes it."""

    parameters: tuple            # its Fused parameters
    scaled_inputs: bool          # the MoE block multiplies each expert's input by the router score (Llama 4),
    #                              not its output (Granite 4, as Mixtral): calibration's module differs
    model_type: str | None       # whose transformers conversion mapping gets per-expert converters to load
    #                              the split artifact (None: transformers reads it as it is)


# transformers' fused experts modules whose parameters are written one Linear per expert (the layouts above)
SPLIT = {
    "Llama4TextExperts": Layout((Fused("experts.gate_up_proj", NAMES[:2], True), Fused("experts.down_proj",
                                                                                       NAMES[2:], True)),
                                scaled_inputs=True, model_type=None),
    "GraniteMoeHybridExperts": Layout((Fused("input_linear.weight", NAMES[:2], False),
                                       Fused("output_linear.weight", NAMES[2:], False)),
                                      scaled_inputs=False, model_type="granitemoehybrid"),
}
PARAMETERS = {fused.suffix: fused for layout in SPLIT.values() for fused in layout.parameters}


def parameter(name: str, shape: tuple) -> tuple | None:
    """(MoE block path, Fused) of a checkpoint tensor that is a fused experts parameter of a layout above
    (by name and rank); None for any other."""
    if len(shape) != 3:
        return None
    for suffix, fused_parameter in PARAMETERS.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], fused_parameter
    return None


def fused(name: str, shape: tuple) -> bool:
    """Whether a checkpoint tensor is a fused experts parameter of a layout above (by name and rank)."""
    return parameter(name, shape) is not None


def splittable(name: str, shape: tuple, modules: dict) -> bool:
    """Whether a checkpoint tensor is a fused parameter of an experts module (modules: name -> class
    name) that is written one Linear per expert."""
    found = parameter(name, shape)
    layout = SPLIT.get(modules.get(f"{found[0]}.experts")) if found else None
    return layout is not None and found[1] in layout.parameters


def linears(name: str, shape: tuple) -> list:
    """[(module name, (out, in))] of the per-expert Linears a fused parameter holds, expert by expert."""
    block, held = parameter(name, shape)
    count, first, second = shape
    rows, columns = (second, first) if held.inputs_first else (first, second)
    return [(f"{block}.experts.{expert}.{part}", (rows // len(held.parts), columns))
            for expert in range(count) for part in held.parts]


def one(fused_tensor, expert: int, part: str, held: Fused):
    """Expert `expert`'s Linear `part` [out, in] held by a fused parameter (a contiguous copy of its values)."""
    if held.inputs_first:
        return fused_tensor[expert].chunk(len(held.parts), dim=-1)[held.parts.index(part)].t().contiguous()
    return fused_tensor[expert].chunk(len(held.parts), dim=0)[held.parts.index(part)].contiguous()


def split(name: str, tensor) -> dict:
    """{module name: weight [out, in]} of the per-expert Linears a fused parameter holds."""
    block, held = parameter(name, tuple(tensor.shape))
    return {f"{block}.experts.{expert}.{part}": one(tensor, expert, part, held)
            for expert in range(tensor.shape[0]) for part in held.parts}


def holder(name: str, held) -> str | None:
    """The fused parameter, among held (a container of names: the checkpoint's), that holds the weight of one
    per-expert Linear (`{block}.experts.E.gate_proj.weight`), the first of the layouts'; None when name is
    not one."""
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "weight" or not parts[-3].isdigit() or parts[-4] != "experts":
        return None
    block, part = ".".join(parts[:-4]), parts[-2]
    return next((f"{block}.{suffix}" for suffix, fused_parameter in PARAMETERS.items()
                 if part in fused_parameter.parts and f"{block}.{suffix}" in held), None)


def expert_weight(name: str, read, held):
    """The weight [out, in] of one per-expert Linear, sliced from the fused parameter read(its holder)
    returns; None when name is not one (holder)."""
    source = holder(name, held)
    if source is None:
        return None
    parts = name.split(".")
    return one(read(source), int(parts[-3]), parts[-2], PARAMETERS[source.removeprefix(".".join(parts[:-4]) + ".")])


def sliced(read, tensors: dict):
    """read(name) -> tensor (the reader of the tensor index tensors), also for the per-expert Linears'
    weights of fused parameters the index holds instead (expert_weight): each fused parameter read once
    while its experts are read in a row (a layer's), dropped at the next other name."""
    kept = {}

    def fused_read(name: str):
        if name not in kept:
            kept[name] = read(name)
        return kept[name]

    def reading(name: str, **kwargs):
        found = None if name in tensors else expert_weight(name, fused_read, tensors)
        if found is None:
            kept.clear()
            return read(name, **kwargs)
        return found

    return reading


def expert_class(module: str, modules: dict) -> str | None:
    """"Linear" for a per-expert Linear (`...experts.E.gate_proj`) of an experts module written split
    (modules: name -> class name, as the checkpoint's model holds them); None for anything else."""
    stem, _, part = module.rpartition(".")
    stem, _, index = stem.rpartition(".")
    return "Linear" if index.isdigit() and part in NAMES and modules.get(stem) in SPLIT else None


def converters(model_type: str) -> list:
    """transformers' weight converters that read a split layout of model_type's experts back into its fused
    parameters (those of Mixtral in transformers' conversion_mapping.py, with the names written here):
    every expert's gate and up stacked then concatenated along the rows, the down projections stacked.
    [] when transformers reads the split layout as it is."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    found = []
    for layout in (layout for layout in SPLIT.values() if layout.model_type == model_type):
        for held in layout.parameters:
            target = "gate_up_proj" if len(held.parts) == 2 else held.parts[0]
            operations = [MergeModulelist(dim=0)] + ([Concatenate(dim=1)] if len(held.parts) > 1 else [])
            found.append(WeightConverter(source_patterns=[f".experts.*.{part}.weight" for part in held.parts],
                                         target_patterns=f".experts.{target}", operations=operations))
    return found


@contextlib.contextmanager
def reading(config: dict | None):
    """While transformers loads a checkpoint of config (config.json), its model type's conversion mapping
    with converters(): the split experts of a model transformers keeps fused are read, each dequantized by
    transformers' compressed-tensors quantizer, into its fused parameters. transformers' table is as it was
    afterwards (it is global: a load inside this block is the only one that sees the change)."""
    model_type = (config or {}).get("model_type")
    added = converters(model_type) if model_type else []
    if not added:
        yield
        return
    from transformers import conversion_mapping as mapping

    before = mapping.get_checkpoint_conversion_mapping(model_type)
    registered = model_type in mapping.USER_REGISTERED_MAPPINGS
    mapping.register_checkpoint_conversion_mapping(model_type, [*(before or []), *added], overwrite=True)
    try:
        yield
    finally:
        if before is None:
            mapping._checkpoint_conversion_mapping_cache.pop(model_type, None)
        else:
            mapping.register_checkpoint_conversion_mapping(model_type, before, overwrite=True)
        if not registered:
            mapping.USER_REGISTERED_MAPPINGS.discard(model_type)
