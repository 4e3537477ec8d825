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

gpt-oss (GptOssExperts) stores `mlp.experts.gate_up_proj` [E, hidden, 2 x inter] with gate and up interleaved
along the last dimension (gate the even columns, up the odd), `down_proj` [E, inter, hidden], each with a bias
[E, out]. vLLM 0.32 reads it per expert under its own fused names (models/gpt_oss.py l. 72-81
_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD, l. 1288-1338 _try_load_streamed_expert, l. 259-284
_load_packed_expert for CompressedTensorsWNA16MoEMethod): expert e's gate_up as one Linear [2 x inter, hidden],
rows interleaved as they are, written `{block}.experts.e.w13_weight_packed` / `w13_weight_scale`, its down as
`w2_...`; no `weight_shape` (l. 1210: any other `.w13_weight...` name is taken for a fused BF16 tensor and
sliced as three-dimensional), the biases left fused as the source holds them (l. 1236-1250). transformers
reads no such checkpoint; vLLM is its runtime (builder/release/fused.py says which recipes).
"""

import contextlib
from dataclasses import dataclass

NAMES = ("gate_proj", "up_proj", "down_proj")  # one expert's Linears as written (vLLM's checkpoint names)
# a per-expert Linear's tensors a compressed-tensors writer may write (weight without weight_scale: left
# unquantized)
STORED = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale")


@dataclass(frozen=True)
class Fused:
    """One fused experts parameter on disk."""

    block: str           # the MoE block's own name in its decoder layer (what tells families' layouts apart)
    suffix: str          # the end of its name, after the MoE block's path
    parts: tuple         # the Linears of one expert it holds, in order along its output features
    inputs_first: bool   # each expert's matrix [in, out] (x @ W: Llama 4), not nn.Linear's [out, in]
    joiner: str = "."    # between a per-expert Linear's name and its tensors' (gpt-oss: `w13_weight_packed`)
    shapes: bool = True  # whether a packed weight's `weight_shape` is written (not for gpt-oss: vLLM misreads it)


@dataclass(frozen=True)
class Layout:
    """transformers' fused experts module of one family, as a quantized build writes it."""

    parameters: tuple            # its Fused parameters
    scaled_inputs: bool          # the MoE block multiplies each expert's input by the router score (Llama 4),
    #                              not its output (Granite 4, as Mixtral): calibration's module differs
    model_type: str | None       # whose transformers conversion mapping gets per-expert converters to load
    #                              the split artifact (None: transformers reads it as it is, or not: gpt-oss)
    interleaved: bool = False    # gate and up interleaved in one Linear with biases, gpt-oss's gate (calibration)


# transformers' fused experts modules whose parameters are written one Linear per expert (the layouts above)
SPLIT = {
    "Llama4TextExperts": Layout((Fused("feed_forward", "experts.gate_up_proj", NAMES[:2], True),
                                 Fused("feed_forward", "experts.down_proj", NAMES[2:], True)),
                                scaled_inputs=True, model_type=None),
    "GraniteMoeHybridExperts": Layout((Fused("block_sparse_moe", "input_linear.weight", NAMES[:2], False),
                                       Fused("block_sparse_moe", "output_linear.weight", NAMES[2:], False)),
                                      scaled_inputs=False, model_type="granitemoehybrid"),
    "GptOssExperts": Layout((Fused("mlp", "experts.gate_up_proj", ("w13",), True, "_", False),
                             Fused("mlp", "experts.down_proj", ("w2",), True, "_", False)),
                            scaled_inputs=False, model_type=None, interleaved=True),
}
PARAMETERS = {f"{fused.block}.{fused.suffix}": fused for layout in SPLIT.values() for fused in layout.parameters}
# the per-expert Linears written under a joiner of their layout's own (gpt-oss's w13, w2), and their Fused
JOINED = {part: fused for fused in PARAMETERS.values() if fused.joiner != "." for part in fused.parts}


def parameter(name: str, shape: tuple) -> tuple | None:
    """(MoE block path, Fused) of a checkpoint tensor that is a fused experts parameter of a layout above
    (by name and rank); None for any other."""
    if len(shape) != 3:
        return None
    for qualified, fused_parameter in PARAMETERS.items():
        if name.endswith("." + qualified):
            return name[: -len(fused_parameter.suffix) - 1], fused_parameter
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


def holding(name: str, held) -> tuple | None:
    """(name, Fused) of the fused parameter, among held (a container of names: the checkpoint's), that holds
    the weight of one per-expert Linear (`{block}.experts.E.gate_proj.weight`), the first of the layouts';
    None when name is not one."""
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "weight" or not parts[-3].isdigit() or parts[-4] != "experts":
        return None
    block, part = ".".join(parts[:-4]), parts[-2]
    return next(((f"{block}.{fused_parameter.suffix}", fused_parameter) for fused_parameter in PARAMETERS.values()
                 if part in fused_parameter.parts and block.endswith("." + fused_parameter.block)
                 and f"{block}.{fused_parameter.suffix}" in held), None)


def holder(name: str, held) -> str | None:
    """The name of the fused parameter holding a per-expert Linear's weight (holding); None when none does."""
    found = holding(name, held)
    return found and found[0]


def expert_weight(name: str, read, held):
    """The weight [out, in] of one per-expert Linear, sliced from the fused parameter read(its holder)
    returns; None when name is not one (holding)."""
    found = holding(name, held)
    if found is None:
        return None
    parts = name.split(".")
    return one(read(found[0]), int(parts[-3]), parts[-2], found[1])


def written(name: str) -> str | None:
    """The artifact's name of a tensor of a per-expert Linear (`{block}.experts.E.{part}.{tensor}`, as the
    writer composes it) in its layout: gpt-oss's `{block}.experts.E.w13_weight_packed`; None for a tensor the
    layout leaves out (gpt-oss's `weight_shape`); any other name as it is."""
    stem, _, tensor = name.rpartition(".")
    module, _, part = stem.rpartition(".")
    held = JOINED.get(part)
    if held is None or not module.rpartition(".")[2].isdigit():
        return name
    if tensor == "weight_shape" and not held.shapes:
        return None
    return f"{stem}{held.joiner}{tensor}"


def as_written(found: dict) -> dict:
    """{name: tensor} of per-expert Linears' tensors under their artifact names (written), those the layout
    leaves out dropped."""
    return {name: value for key, value in found.items() if (name := written(key))}


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
    layout = SPLIT.get(modules.get(stem))
    return "Linear" if index.isdigit() and layout and any(part in held.parts for held in layout.parameters) else None


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


def unread(tensors: dict) -> bool:
    """Whether an artifact (tensors: its tensor index) holds experts in a layout transformers does not read
    (gpt-oss's, under vLLM's names): loading it reports them unexpected and the fused parameters missing,
    which filled sets."""
    for name in tensors:
        stem, _, tensor = name.rpartition(".")
        part, _, leaf = tensor.partition("_")
        if part in JOINED and leaf and stem.rpartition(".")[2].isdigit():
            return True
    return False


def filled(model, tensors: dict, config: dict) -> set:
    """Sets the fused experts parameters of model (transformers' own, left unset as it loaded the
    compressed-tensors artifact whose tensor index is tensors) from the artifact's per-expert Linears of a layout transformers does
    not read (gpt-oss's): each decompressed by compressed-tensors' own decompressor (the format's, with the
    artifact's scheme), then stacked as the fused parameter holds them. In place; returns their names."""
    import torch

    from builder.tensorfile import reader

    unset = {}  # name -> (fused parameter, its MoE block's path, Fused, one expert's Linear's shape)
    for module_name, module in model.named_modules():
        for held in SPLIT[type(module).__name__].parameters if type(module).__name__ in SPLIT else ():
            name = f"{module_name.rpartition('.')[0]}.{held.suffix}"
            if held.joiner != "." and name not in tensors:
                fused_tensor = model.get_parameter(name)
                unset[name] = (fused_tensor, *parameter(name, tuple(fused_tensor.shape)),
                               linears(name, tuple(fused_tensor.shape))[0][1])
    if not unset:
        return set()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    quantization = config["quantization_config"]
    (group,) = quantization["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.load_from_registry(quantization["format"])
    with reader(tensors) as read, torch.no_grad():
        for fused_tensor, block, held, shape in unset.values():
            (part,), stacked = held.parts, []
            for expert in range(fused_tensor.shape[0]):
                module = f"{block}.experts.{expert}.{part}"
                stored = {leaf: read(f"{module}{held.joiner}{leaf}") for leaf in STORED
                          if f"{module}{held.joiner}{leaf}" in tensors}
                if "weight_scale" in stored:  # quantized: decompressed as compressed-tensors reads its format
                    stored = compressor.decompress({**stored, "weight_shape": torch.tensor(shape)}, scheme)
                stacked.append(stored["weight"].t() if held.inputs_first else stored["weight"])
            fused_tensor.data = torch.stack(stacked).to(fused_tensor.dtype)
    return set(unset)
