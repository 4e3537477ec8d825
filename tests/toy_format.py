"""A toy output format, as a new format module would be written (tests/test_formats.py registers it):
each quantized Linear as FP8 `weight` and an F32 per-row `toy_scale`, config.json marked
`quant_method: toy`, read back by its own loader. Nothing outside this module knows it."""

from pathlib import Path

from builder.formats import dense
from builder.tensorfile import Output, index_of, reader

VERSION = 1
PACKAGES = ()
QUANTIZER = None       # rounded with compressed-tensors' arithmetic (quantize.float)
FAMILIES = None
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = None
SCALES = ("toy_scale",)


def problems(recipe, rules) -> list:
    """FP8 per-row weights, nothing else quantized."""
    if recipe.weights is None:
        return [(("quant", "weights"), "format toy needs weight quantization arguments")]
    found = rules(recipe)
    if (recipe.weights.type, recipe.weights.strategy) != ("float", "channel"):
        found.append((("quant", "weights"), "format toy holds FP8 per-channel weights"))
    for key in ("input_activations", "kv_cache_scheme"):
        if getattr(recipe, key) is not None:
            found.append((("quant", key), "must be null with format toy"))
    return found


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization_config", {}).get("quant_method") == "toy"


def load(folder: Path, config: dict, decode=None):
    """Each quantized weight as weight * toy_scale in FP32, every other tensor cast."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(folder)
    del model_config.quantization_config
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).eval()
    parameters = dict(model.named_parameters())
    file = folder / "model.safetensors"
    tensors = index_of([file])
    with reader(tensors) as read, torch.no_grad():
        for name in sorted(n for n in tensors if not n.endswith(".toy_scale")):
            scale = name[: -len(".weight")] + ".toy_scale"
            value = read(name).float() * read(scale)[:, None] if scale in tensors else read(name)
            parameters[name].copy_(value)
    model.tie_weights()
    return model


def prepare(path: Path, config: dict, spec: dict) -> dict:
    return {}


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    import torch

    if not targeted:
        return [dense.stored(name, dtype, shape, recipe)]
    return [Output(name, torch.float8_e4m3fn, tuple(shape)),
            Output(name[: -len(".weight")] + ".toy_scale", torch.float32, (shape[0],))]


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return {}


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    import torch

    values, scale = arithmetic.weight(name, tensor, torch.float32)
    return {name: values, name[: -len(".weight")] + ".toy_scale": scale.reshape(-1)}


def config(source: dict, recipe, routers: list = ()) -> dict:
    return {**dense.normalised(source, recipe), "quantization_config": {"quant_method": "toy"}}
