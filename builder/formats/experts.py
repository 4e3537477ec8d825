"""Experts transformers keeps fused on disk, written one Linear per expert under the names vLLM's loader
reads. Not a format: the compressed-tensors writer (formats/compressed_tensors.py), the writer's
targeting and calibration (quant/) ask it.

Llama 4 (transformers' Llama4TextExperts) stores `experts.gate_up_proj` [E, hidden, 2 x inter] and
`experts.down_proj` [E, inter, hidden]: each expert's weight with its input features first (x @ W), gate
the first half of gate_up's last dimension and up the second. Expert e's Linears, [out, in] as nn.Linear
holds them: `experts.e.gate_proj` = gate_up_proj[e, :, :inter]ᵀ, `experts.e.up_proj` =
gate_up_proj[e, :, inter:]ᵀ, `experts.e.down_proj` = down_proj[e]ᵀ: what vLLM 0.32's Llama 4 loader maps
per expert (models/llama4.py load_weights, l. 555-562) and llm-compressor's Llama4LinearExperts writes.
Splitting is slicing and transposing: every value is the source's, exactly. transformers 5.17 loads
such a compressed-tensors artifact as it is: its quantizers replace Llama4TextExperts by
SequentialLlama4TextExperts, one Llama4TextMLP (gate_proj, up_proj, down_proj) per expert
(quantizers/base.py, MODULES_TO_PATCH_FOR_QUANTIZATION), so evaluation runs transformers' Llama 4 on
the dequantized per-expert weights (activations quantized as on any Linear); a BF16 artifact keeps the
fused layout transformers' plain Llama 4 reads.
"""

# transformers' fused experts modules whose parameters are written one Linear per expert (the layout above)
SPLIT = ("Llama4TextExperts",)
# a fused parameter -> the Linears of one expert it holds, in order along its last dimension
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
LEAF = {part: leaf for leaf, parts in PARTS.items() for part in parts}  # a Linear -> the fused parameter holding it


def fused(name: str, shape: tuple) -> bool:
    """Whether a checkpoint tensor is a fused experts parameter of the layout above (by name and rank)."""
    stem, _, leaf = name.rpartition(".")
    return len(shape) == 3 and leaf in PARTS and stem.endswith(".experts")


def splittable(name: str, shape: tuple, modules: dict) -> bool:
    """Whether a checkpoint tensor is a fused parameter of an experts module (modules: name -> class
    name) that is written one Linear per expert."""
    return fused(name, shape) and modules.get(name.rpartition(".")[0]) in SPLIT


def linears(name: str, shape: tuple) -> list:
    """[(module name, (out, in))] of the per-expert Linears a fused parameter holds, expert by expert."""
    stem, _, leaf = name.rpartition(".")
    count, columns, width = shape
    parts = PARTS[leaf]
    return [(f"{stem}.{expert}.{part}", (width // len(parts), columns)) for expert in range(count) for part in parts]


def one(fused_tensor, expert: int, part: str):
    """Expert `expert`'s Linear `part` [out, in] held by a fused parameter (a contiguous copy of its values)."""
    held = PARTS[LEAF[part]]
    return fused_tensor[expert].chunk(len(held), dim=-1)[held.index(part)].t().contiguous()


def split(name: str, tensor) -> dict:
    """{module name: weight [out, in]} of the per-expert Linears a fused parameter holds."""
    stem, _, leaf = name.rpartition(".")
    return {f"{stem}.{expert}.{part}": one(tensor, expert, part)
            for expert in range(tensor.shape[0]) for part in PARTS[leaf]}


def expert_weight(name: str, read):
    """The weight [out, in] of one per-expert Linear (`...experts.E.gate_proj.weight`), sliced from the
    fused parameter read(fused name) holds; None when name is not one."""
    parts = name.split(".")
    if len(parts) < 4 or parts[-1] != "weight" or not parts[-3].isdigit() or parts[-4] != "experts":
        return None
    stem, expert, part = ".".join(parts[:-3]), int(parts[-3]), parts[-2]
    return one(read(f"{stem}.{LEAF[part]}"), expert, part) if part in LEAF else None


def sliced(read, tensors: dict):
    """read(name) -> tensor (the reader of the tensor index tensors), also for the per-expert Linears'
    weights of fused parameters the index holds instead (expert_weight): each fused parameter read once
    while its experts are read in a row (a layer's), dropped at the next other name."""
    kept = {}

    def fused(name: str):
        if name not in kept:
            kept[name] = read(name)
        return kept[name]

    def reading(name: str, **kwargs):
        found = None if name in tensors else expert_weight(name, fused)
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
    return "Linear" if index.isdigit() and part in LEAF and modules.get(stem) in SPLIT else None
