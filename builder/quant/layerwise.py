"""Run the source model one decoder layer at a time (FP32, on the calibration device): each layer gets
the inputs the model's own forward gives it (embedding scale, per-layer-type rotary embeddings,
sliding-window masks), recorded once by running that forward with stand-ins for the layers; then
each layer runs over every batch, its outputs replacing its inputs. calibrate.py walks the layers.

    hidden, arguments = layerwise.first_inputs(model, config, read, ids, device)
    layerwise.run(layer, index, hidden, arguments, replace=True)
"""

import torch

from builder.errors import BuilderError, Problem
from builder.quant import quantize
from builder.source import skeleton

BATCH = 4  # calibration samples per forward pass: fixed, so every reduction splits the same way


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

    if kind == "sdpa":
        attend = importlib.import_module("transformers.integrations.sdpa_attention").sdpa_attention_forward
        mask = sdpa_mask
    else:  # eager: Gemma 2's (sdpa would drop the attention logits' softcapping), or a model module's own
        module = "transformers.models.gemma2.modeling_gemma2" if kind == "eager" else kind  # (gpt-oss's sinks)
        attend, mask = importlib.import_module(module).eager_attention_forward, eager_mask
    name = f"builder_observed_{kind.rpartition('.')[2]}"
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
    if getattr(model.model, "rotary_emb", None) is not None:  # Granite 4's default has none (NoPE)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq buffers, on CPU


def materialize(module: torch.nn.Module, prefix: str, family, read, device=torch.device("cpu"),
                stored: bool = False) -> None:
    """Give a meta module real weights read from the checkpoint (names under prefix), one tensor at a
    time, in FP32: reading the whole layer first would hold it twice (as read, and FP32 in place).

    stored: its Linears' weights keep the checkpoint's dtype and each Linear computes with an FP32 copy
    made as it runs (compute_with): the layer holds its Linears at their stored size and one FP32
    weight at a time. The forward's values are unchanged: the copy is the very tensor copying into
    FP32 makes (BF16 and FP16 widen to FP32 exactly), met by torch.nn.Linear's own F.linear.
    """
    linears = {name + ".weight": linear for name, linear in module.named_modules()
               if stored and type(linear) is torch.nn.Linear}  # a subclass may compute otherwise
    names = list(module.state_dict())  # the order tensors are read in, as before
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}
    for linear in linears.values():
        del linear.weight  # no FP32 storage is made for it below
    module.to_empty(device=device)
    module.to(torch.float32)
    tensors = module.state_dict()
    with torch.no_grad():
        for name in names:
            disk = skeleton.checkpoint_name(prefix + name, family)
            value = read(disk)
            quantize.require_finite(disk, value)
            if name not in linears:
                tensors[name].copy_(value)
                continue
            if tuple(value.shape) != shapes[name]:  # copy_ into the FP32 tensor refused these
                raise BuilderError(Problem("source weights", disk, f"shape {tuple(value.shape)}, the model's "
                                           f"config makes it {shapes[name]}"))
            linear = linears[name]
            linear.weight = torch.nn.Parameter(value.to(device), requires_grad=False)
            compute_with(linear, lambda linear=linear: linear.weight.to(torch.float32))


def compute_with(linear: torch.nn.Linear, weight) -> None:
    """linear's forward computes with weight() (an FP32 tensor made as it runs, dropped after) in place
    of its own weight, as torch.nn.Linear does: F.linear(x, weight(), bias). release() undoes it."""
    linear.forward = lambda x: torch.nn.functional.linear(x, weight(), linear.bias)


def release(module: torch.nn.Module) -> None:
    """Free a layer's weights (to meta) and give its modules back their own forwards (compute_with's
    hold what they compute with)."""
    for part in module.modules():
        vars(part).pop("forward", None)
    module.to_empty(device="meta")


def first_inputs(model, config, read, ids: torch.Tensor, device: torch.device, streams: int = 1) -> tuple:
    """(hidden, arguments): the hidden states entering layer 0 as a list of batches of BATCH samples
    of ids [samples, length] (on the device when streams copies of them fit, see hidden_states_device),
    and per batch size each layer's (args, kwargs) on the device. The embedding is freed afterwards (meta)."""
    rows, indices = torch.unique(ids, sorted=True, return_inverse=True)
    prepare_model_inputs(model, config, read, rows)
    storage = hidden_states_device(device, ids, config.hidden_size * streams)
    hidden, arguments = [], {}
    for batch in indices.split(BATCH):
        calls = layer_inputs(model, batch, every_layer=len(batch) not in arguments)
        hidden.append(calls[0][0].to(storage))
        arguments.setdefault(len(batch), [on(device, (a, k)) for _, a, k in calls])
    model.model.embed_tokens.to_empty(device="meta")  # needed for layer 0's inputs only
    return hidden, arguments


def run(layer: torch.nn.Module, index: int, hidden: list, arguments: dict, replace: bool,
        beside: tuple | None = None) -> None:
    """Run decoder layer index over every batch of hidden states with the inputs the model gives it
    (on the layer's device); with replace, each batch's outputs take its inputs' place (where it was).

    beside: (the source model's hidden states, running): each batch of them runs first, inside
    running() (the hooks of that stream hear it), and its outputs always take its inputs' place."""
    device = next(layer.parameters()).device
    with torch.no_grad():
        for position, batch in enumerate(hidden):
            args, kwargs = arguments[len(batch)][index]
            if beside is not None:
                source, running = beside
                with running():
                    result = layer(source[position].to(device), *args, **kwargs)
                source[position] = output(result).to(source[position].device)
            result = layer(batch.to(device), *args, **kwargs)
            if replace:
                hidden[position] = output(result).to(batch.device)
            del result


def output(result) -> torch.Tensor:
    """A decoder layer's hidden states out of what its forward returns."""
    return result[0] if isinstance(result, tuple) else result


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
