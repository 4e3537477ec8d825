"""Format dense: Hugging Face safetensors of unquantized tensors in the recipe's dtype, config.json as
the source's (normalised). The other safetensors formats keep their untargeted tensors this way.

    builder build smollm2-135m-instruct-bf16
"""

from pathlib import Path

from builder.formats import checks
from builder.tensorfile import Output

VERSION = 1            # unquantized tensors in the output dtype
PACKAGES = ()
QUANTIZER = None
FAMILIES = None
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = None
SCALES = ()
# Keys transformers stamps with local facts (paths); dropped so the artifact does not depend on them.
UNSTABLE_CONFIG_KEYS = ("_name_or_path",)


def problems(recipe, rules) -> list:
    """A dense recipe quantizes nothing (rules, compressed-tensors' arithmetic, do not apply)."""
    return checks.unquantized(recipe)


def recognizes(folder: Path, config: dict | None) -> bool:
    """A config.json without a quantization block (a source checkpoint reads as dense too)."""
    return config is not None and "quantization_config" not in config and "quantization" not in config


def load(folder: Path, config: dict | None, decode=None, **kwargs):
    """The checkpoint through transformers' own loading, in FP32, in eval mode (kwargs: from_pretrained's, e.g. a
    quantizer; with output_loading_info, (model, its loading info) as from_pretrained returns them)."""
    import torch
    from transformers import AutoModelForCausalLM

    found = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False, **kwargs)
    (found[0] if kwargs.get("output_loading_info") else found).eval()
    return found


def widened(model):
    """The model with its 16-bit parameters and buffers in FP32 (exact): a dequantizing loader may return
    BF16 weights whatever dtype it was asked for, which FP32 activations cannot multiply."""
    import torch

    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor.data = tensor.data.float()
    return model


def prepare(path: Path, config: dict, spec: dict) -> dict:
    """Nothing to read besides the tensors: config.json and the tokenizer files are copied."""
    return {}


def stored(name: str, dtype, shape: tuple, recipe) -> Output:
    """An unquantized tensor as written: floating tensors in the recipe's dtype, others as they are."""
    import torch

    return Output(name, getattr(torch, recipe.dtype) if dtype.is_floating_point else dtype, tuple(shape))


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    """Every tensor as it is, in the recipe's dtype."""
    return [stored(name, dtype, shape, recipe)]


def normalised(source: dict, recipe) -> dict:
    """The source config.json without local stamps, with the output dtype."""
    config = {key: value for key, value in source.items() if key not in UNSTABLE_CONFIG_KEYS}
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    return config


def config(source: dict, recipe, routers: list = ()) -> dict:
    """config.json: the source's, normalised."""
    return normalised(source, recipe)
