"""The model transformers builds from a checkpoint's config.json, on the meta device (no memory), with
its modules named as the checkpoint names its tensors, and what a build derives from it.

Names and expert layout are transformers' own: the renamings and expert converters it applies when it
loads a checkpoint (transformers.conversion_mapping), reversed as its save_pretrained reverses them.
Mixture-of-experts families are built by transformers 5 with fused 3-D expert parameters
(mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) while checkpoints, vLLM and llm-compressor
keep one 2-D weight per expert: the experts module is replaced by one nn.Linear per expert weight,
named as the converter names it on disk, computing exactly what transformers' eager experts forward
computes (tests hold it equal), so that every expert is a Linear a recipe targets, a hook observes and
GPTQ rounds. Nothing here is written per family (builder/release/families.py holds what cannot be derived),
but for experts kept fused on disk that a quantized build splits (formats/experts.py SPLIT): Experts too
where the router weighs each expert's output (Granite 4), ScaledExperts where the MoE block scales each
expert's input by its router score (Llama 4), for calibration.
"""

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from builder.formats import experts as split_experts
from builder.release import families


class Expert(nn.Module):
    """One expert's gate, up and down projections, named as the checkpoint names them."""

    def __init__(self, hidden: int, size: int, names: tuple, act):
        super().__init__()
        self.names, self.act = names, act
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, size, bias=False))
        setattr(self, up, nn.Linear(hidden, size, bias=False))
        setattr(self, down, nn.Linear(size, hidden, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """transformers' fused experts as a list of Experts: the same routing arithmetic (eager)."""

    def __init__(self, fused: nn.Module, names: tuple):
        count, double, hidden = fused.gate_up_proj.shape
        super().__init__(Expert(hidden, double // 2, names, fused.act_fn) for _ in range(count))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        chosen = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
        for expert in torch.greater(chosen.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            position, tokens = torch.where(chosen[expert])
            result = self.run(expert, hidden_states[tokens]) * top_k_weights[tokens, position, None]
            out.index_add_(0, tokens, result.to(out.dtype))
        return out

    def run(self, expert: int, x):
        """One expert's output for the tokens routed to it."""
        return self[expert](x)


class InterleavedExperts(Experts):
    """gpt-oss's experts (GptOssExperts: gate and up interleaved in one matrix, biases, its clamped gate) as
    one w13 and one w2 Linear per expert, named as written (formats/experts.py), the biases kept fused under
    their checkpoint names, the gate GptOssExperts' own: the same routing arithmetic, for calibration."""

    def __init__(self, fused: nn.Module):
        count, hidden, double = fused.gate_up_proj.shape
        nn.ModuleList.__init__(self, (nn.ModuleDict({"w13": nn.Linear(hidden, double, bias=False),
                                                     "w2": nn.Linear(double // 2, hidden, bias=False)})
                                      for _ in range(count)))
        self.gate_up_proj_bias, self.down_proj_bias = fused.gate_up_proj_bias, fused.down_proj_bias
        self.gate = fused._apply_gate

    def run(self, expert: int, x):
        linears = self[expert]
        return linears.w2(self.gate(linears.w13(x) + self.gate_up_proj_bias[expert])) + self.down_proj_bias[expert]


class ScaledExperts(nn.Module):
    """A mixture-of-experts block whose experts are kept fused on disk and scale their input by the router
    score (Llama 4's Llama4TextMoe: formats/experts.py writes them one Linear per expert), with one Expert
    per expert named as written: each runs on the tokens routed to it only, times their score, as the
    fused experts compute it (their other rows are zeros: no input, no Hessian rows), plus the shared expert."""

    def __init__(self, block: nn.Module):
        super().__init__()
        count, hidden, double = block.experts.gate_up_proj.shape
        self.router, self.shared_expert, self.top_k = block.router, block.shared_expert, block.top_k
        self.experts = nn.ModuleList(Expert(hidden, double // 2, split_experts.NAMES, block.experts.act_fn)
                                     for _ in range(count))  # named as written

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, logits = self.router(hidden_states)
        chosen = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice (Llama4Router)
        out = self.shared_expert(hidden_states)
        for expert in range(len(self.experts)):
            tokens = torch.where((chosen == expert).any(dim=1))[0]
            if len(tokens):
                routed = hidden_states[tokens] * scores[tokens, expert, None]
                out.index_add_(0, tokens, self.experts[expert](routed).to(out.dtype))
        return out, logits


class KeptLinear(nn.Linear):
    """A Linear the runtime builds unquantized (a gate the family's row names): its class is not a
    recipe's Linear target, so it stays in the output dtype and is named in ignore with the routers."""


def build(config_dir: Path, attention=None, split: bool = False):
    """(config, family, model): the meta-device model, in eval mode, experts unfused.

    attention: attention(family) -> the name of an attention implementation registered with
    transformers (calibration's observer); None for transformers' default.
    family: the family's row (builder/release/families.py), or a row of defaults for any other
    decoder-only *ForCausalLM, with the checkpoint renamings derived from transformers; None for
    anything else (the caller refuses it).
    split: experts kept fused on disk that a quantized build writes one Linear per expert (formats/experts.py
    SPLIT: Llama 4 as ScaledExperts, Granite 4 as Experts, gpt-oss as InterleavedExperts), for calibration;
    without it they stay as the checkpoint holds them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    family = families.of_class((config.architectures or [None])[0])
    if family is not None and family.calibrate_with == "sdpa":
        from transformers.models.auto.auto_factory import _get_model_class

        model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
        if not model_class._supports_sdpa:  # gpt-oss's attention sinks: its own eager attention
            family = dataclasses.replace(family, calibrate_with=model_class.__module__)
    options = {"attn_implementation": attention(family)} if attention and family else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, experts_implementation="eager",
                                                 **options)
        renames, experts = conversions(model)
        layers = getattr(getattr(model, "model", None), "layers", None)
        for layer in layers if family is not None and isinstance(layers, nn.ModuleList) else ():
            fused = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts and unfusable(fused):
                layer.mlp.experts = Experts(fused, experts)
            for child, block in list(layer.named_children()) if split else ():
                layout = split_experts.SPLIT.get(type(getattr(block, "experts", None)).__name__)
                if layout is not None and layout.scaled_inputs:
                    setattr(layer, child, ScaledExperts(block))
                elif layout is not None and layout.interleaved:
                    block.experts = InterleavedExperts(block.experts)
                elif layout is not None:  # the plain fused layout (unfusable), outputs weighed by the router
                    block.experts = Experts(block.experts, split_experts.NAMES)
            for name, module in layer.named_modules():
                if name.endswith(family.unquantized) and type(module) is nn.Linear:
                    module.__class__ = KeptLinear
                if not family.planned:
                    persistent_buffers_as_parameters(module)
    model.eval()  # from_config leaves training mode on: dropout, and random routing in some MoE families
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        family = None  # calibration walks model.model.layers: not a decoder this builder can run
    if family is not None:
        family = dataclasses.replace(family, renames=renames, expert_names=experts)
    return config, family, model


def persistent_buffers_as_parameters(module: nn.Module) -> None:
    """A layer's persistent buffers (DeepSeek-V3's expert-score bias, MiniMax's decay rates), which
    save_pretrained writes, as frozen parameters: tensors of the checkpoint like the others (planned,
    checked, read back by calibration)."""
    for name in [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]:
        value = module._buffers.pop(name)
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))


def conversions(model) -> tuple:
    """(renamings, expert names): transformers' key renamings for this model reversed (memory -> disk,
    in the order its save_pretrained applies them), and the on-disk (gate, up, down) names of one
    expert from its expert converters (() when it has none: a dense model, or experts stored fused)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    found = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    renames = tuple(c.reverse_transform() for c in reversed(found) if isinstance(c, WeightRenaming))
    named = {}
    for converter in (c for c in found if isinstance(c, WeightConverter)):
        sources = [re.fullmatch(r".*experts\.\*\.(\w+)\.weight", p) for p in converter.source_patterns]
        targets = converter.target_patterns
        if len(targets) == 1 and all(sources) and targets[0].endswith(("experts.gate_up_proj", "experts.down_proj")):
            named[targets[0].rsplit(".", 1)[1]] = [m.group(1) for m in sources]
    if len(named.get("gate_up_proj", ())) == 2 and len(named.get("down_proj", ())) == 1:
        return renames, (*named["gate_up_proj"], *named["down_proj"])
    return renames, ()


def unfusable(fused) -> bool:
    """Whether a module is transformers' plain fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I],
    no biases, no transposed layout): what Experts computes exactly."""
    if fused is None or getattr(fused, "is_transposed", False):
        return False
    params = dict(fused.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(fused, "act_fn"):
        return False
    (count, double, hidden), down = params["gate_up_proj"].shape, params["down_proj"].shape
    return tuple(down) == (count, hidden, double // 2)


def checkpoint_name(name: str, family) -> str:
    """A parameter or module name of the built model -> its name in the checkpoint (transformers'
    renamings reversed: Mixtral keeps its experts and router under block_sparse_moe on disk, ERNIE 4.5
    its expert-score bias beside the router)."""
    if family is None or not family.renames:
        return name
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(name, list(family.renames), [], reverse=True)[0]


def facts(config, family, model) -> dict:
    """The architecture block `builder model add` writes (families.facts), and for a family without a
    planned checkpoint what its model derives: model_type, every tensor on disk (the block's
    `checkpoint`, grouped over layers and experts) and its experts (moe)."""
    block = families.facts(config.to_dict())
    if family is None or family.planned:
        return block
    entries, experts, fused_widths = {}, {}, set()
    hidden = config.get_text_config().hidden_size
    for name, parameter, module in parameters(model):
        disk = checkpoint_name(name, family)
        owner = name.rsplit(".", 1)[0]
        role = tensor_role(owner, module, family, parameter)
        layer = re.match(r"model\.layers\.(\d+)\.", disk)
        expert = re.search(r"\.experts\.(\d+)\.", disk)
        template = re.sub(r"^model\.layers\.\d+\.", "model.layers.{layer}.", disk)
        template = re.sub(r"\.experts\.\d+\.", ".experts.{expert}.", template)
        key = (template, tuple(parameter.shape), role)
        entry = entries.setdefault(key, {"name": template, "shape": list(parameter.shape), "role": role,
                                         "layers": [] if layer else None, "experts": None})
        if layer and int(layer.group(1)) not in entry["layers"]:
            entry["layers"].append(int(layer.group(1)))
        if expert:
            experts.setdefault(int(layer.group(1)), set()).add(int(expert.group(1)))
            entry["experts"] = max(entry["experts"] or 0, int(expert.group(1)) + 1)
        elif role == "fused" and layer and split_experts.fused(disk, tuple(parameter.shape)):  # Llama 4, gpt-oss:
            experts.setdefault(int(layer.group(1)), set()).update(range(parameter.shape[0]))  # every expert, and
            fused_widths |= {columns for _, (rows, columns) in split_experts.linears(disk, tuple(parameter.shape))
                             if rows == hidden}  # its width: the input features of its down projection
    block = {**block, "model_type": config.model_type,
             "checkpoint": [{k: v for k, v in entry.items() if v is not None} for entry in entries.values()]}
    if experts:
        sizes = sorted({getattr(m, m.names[0]).weight.shape[0] for m in model.modules() if isinstance(m, Expert)}
                       | fused_widths)
        layers = range(config.num_hidden_layers)
        block["moe"] = {"num_experts": max(len(found) for found in experts.values()),
                        "num_experts_per_tok": config.num_experts_per_tok, "expert_intermediate_size": sizes[0],
                        "decoder_sparse_step": 1, "mlp_only_layers": [i for i in layers if i not in experts]}
    return block


def parameters(model):
    """(name, parameter, owning module) of every tensor the checkpoint holds once (tied ones once)."""
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        yield name, parameter, modules[name.rsplit(".", 1)[0]] if "." in name else model


def tensor_role(owner: str, module, family, parameter) -> str:
    """expert, linear (a Linear's weight: what a recipe may quantize), router (a gate that stays in the
    output dtype and is named in ignore: transformers' routers, the row's unquantized Linears), fused
    (experts stored as one 3-D tensor, which no recipe can quantize yet), other."""
    if type(module).__name__.endswith("Router") and parameter is getattr(module, "weight", None):
        return "router"  # Llama 4's router is an nn.Linear subclass: a router all the same
    if isinstance(module, nn.Linear) and parameter is module.weight:
        if owner.endswith(family.unquantized):
            return "router"
        return "expert" if ".experts." in owner else "linear"
    if parameter.dim() == 3 and owner.endswith(".experts"):
        return "fused"  # experts kept fused on disk (Llama 4, gpt-oss, Granite 4): no per-expert Linears
    return "other"


def mtp_rows(config, family, model) -> list:
    """[disk name, shape, role] of every tensor of the multi-token-prediction layers a config declares
    (DeepSeek-V3's and GLM-4.5's `num_nextn_predict_layers`, transformers' `num_mtp_layers`), which the
    causal LM transformers builds leaves out: transformers' own MtpModel built on the meta device (its
    decoder block is the model's decoder layer, experts unfused as above), named as the checkpoint
    names them (families.MTP_ON_DISK, in model.layers.{N + k} after the N decoder layers; transformers'
    own MtpModel renamings are ambiguous to reverse: they also read Inkling's layout), plus
    the embedding and head each layer repeats on disk. role: mtp_linear (a Linear's or a router's
    weight: named in ignore, so runtimes build them unquantized), mtp (the rest). [] without any."""
    count = getattr(config.get_text_config(), "num_mtp_layers", None) or 0
    if family is None or count <= 0 or not getattr(model, "_keys_to_ignore_on_load_unexpected", None):
        return []
    from transformers.modeling_layers import MtpModel

    first = config.get_text_config().num_hidden_layers
    with torch.device("meta"):
        mtp = MtpModel(model, count)
        for layer in mtp.layers:
            fused = getattr(getattr(layer.mtp_block, "mlp", None), "experts", None)
            if family.expert_names and unfusable(fused):
                layer.mtp_block.mlp.experts = Experts(fused, family.expert_names)
            for module in layer.modules():
                persistent_buffers_as_parameters(module)
    modules, rows = dict(mtp.layers.named_modules()), []
    for name, parameter in mtp.layers.named_parameters():
        index, rest = name.split(".", 1)
        for memory, disk in families.MTP_ON_DISK:
            rest = rest.replace(memory, disk, 1) if rest.startswith(memory) else rest
        disk = checkpoint_name(f"model.layers.{first + int(index)}.{rest}", family)
        owner = modules[name.rsplit(".", 1)[0]]
        kept = (isinstance(owner, nn.Linear) or type(owner).__name__.endswith("Router")) and parameter is owner.weight
        rows.append([disk, list(parameter.shape), "mtp_linear" if kept else "mtp"])
    vocab = list(model.get_output_embeddings().weight.shape)
    for k in range(count):
        rows += [[f"model.layers.{first + k}.{name}.weight", vocab, "mtp"] for name in ("embed_tokens", "shared_head.head")]
    return sorted(rows)
