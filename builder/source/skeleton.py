"""The model transformers builds from a checkpoint's config.json, on the meta device (no memory), with
its modules named as the checkpoint names its tensors.

Dense families need nothing more. Mixture-of-experts families are built by transformers 5 with fused
3-D expert parameters (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) while checkpoints,
vLLM and llm-compressor keep one 2-D weight per expert: the experts module is replaced by one
nn.Linear per expert weight, named as on disk, computing exactly what transformers' eager experts
forward computes (tests hold it equal), so that every expert is a Linear a recipe targets, a hook
observes and GPTQ rounds.
"""

from pathlib import Path

import torch
from torch import nn

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
            result = self[expert](hidden_states[tokens]) * top_k_weights[tokens, position, None]
            out.index_add_(0, tokens, result.to(out.dtype))
        return out


def build(config_dir: Path, attention=None):
    """(config, family, model): the meta-device model, in eval mode, experts unfused.

    attention: attention(family) -> the name of an attention implementation registered with
    transformers (calibration's observer); None for transformers' default.
    family is None for an architecture the builder does not support (the caller refuses it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    family = families.of_class((config.architectures or [None])[0])
    options = {"attn_implementation": attention(family)} if attention and family else {}
    if family is not None and family.moe is not None:
        options["experts_implementation"] = "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, **options)
        if family is not None and family.moe is not None:
            for layer in model.model.layers:
                if hasattr(getattr(layer, "mlp", None), "experts"):
                    layer.mlp.experts = Experts(layer.mlp.experts, family.moe.experts)
    model.eval()  # from_config leaves training mode on: dropout, and random routing in some MoE families
    return config, family, model


def checkpoint_name(name: str, family) -> str:
    """A parameter or module name of the built model -> its name in the checkpoint (Mixtral keeps its
    experts and router under block_sparse_moe on disk, transformers under mlp)."""
    if family is None or family.moe is None or family.moe.block == "mlp":
        return name
    return name.replace(".mlp.", f".{family.moe.block}.", 1)
