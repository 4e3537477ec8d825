"""Format fp8: the AutoFP8 / vLLM `quant_method: fp8` legacy layout. FP8 per-tensor weights with F32
scalar scales (`weight_scale`, `input_scale` for static activations, a KV projection's `output_scale`),
config.json's quantization_config as AutoFP8 writes it. Rounded as compressed-tensors rounds.

    builder build smollm2-135m-instruct-fp8-static quant.format=fp8
"""

from pathlib import Path

from builder.formats import compressed_tensors, dense

VERSION = 1            # the AutoFP8 / vLLM legacy layout
PACKAGES = ()
QUANTIZER = None       # compressed-tensors' arithmetic: quantize.float
FAMILIES = None
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = "fp8"
SCALES = ("_scale",)   # weight_scale, input_scale, output_scale, k_scale, v_scale


def problems(recipe, rules) -> list:
    """compressed-tensors' rules, and what the layout holds: FP8 per-tensor weights and activations."""
    found = compressed_tensors.problems(recipe, rules)
    weights, acts = recipe.weights, recipe.input_activations
    if weights is not None and not ((weights.type, weights.strategy) == ("float", "tensor") and acts is not None
                                    and acts.type == "float" and acts.strategy == "tensor"):
        found.append((("quant", "format"), "fp8: the legacy layout holds FP8 per-tensor weights and FP8 "
                      "per-tensor activations (static or dynamic); use compressed-tensors otherwise"))
    return found


def recognizes(folder: Path, config: dict | None) -> bool:
    return config is not None and config.get("quantization_config", {}).get("quant_method") == "fp8"


def load(folder: Path, config: dict | None, decode=None):
    """Through transformers' own loading (it dequantizes quant_method fp8 on CPU)."""
    return dense.load(folder, config)


def prepare(path: Path, config: dict, spec: dict) -> dict:
    return dense.prepare(path, config, spec)


def scale_format(recipe) -> tuple:
    """(torch dtype, shape of a per-tensor scale): F32 scalars (shape [])."""
    import torch

    return torch.float32, ()


def kv_name(key: str, projection: str, single: bool) -> str:
    """AutoFP8 names a KV scale after the projection that makes it, k_proj.output_scale; a fused
    qkv_proj makes both, which keep their self_attn.k_scale / v_scale names."""
    return f"{projection}.output_scale" if single else key


def plan(name: str, dtype, shape: tuple, targeted: bool, recipe, kv: list = (), tied: bool = False) -> list:
    return compressed_tensors.outputs(name, dtype, shape, targeted, recipe, kv, scale_format(recipe))


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return compressed_tensors.known_outputs(name, shape, targeted, recipe, calibration, kv, arithmetic,
                                            scale_format(recipe))


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    return compressed_tensors.computed(name, tensor, recipe, arithmetic, scale_format(recipe))


def quantization_config(recipe, routers: list = ()) -> dict:
    """The AutoFP8 / vLLM `quant_method: fp8` config: per-tensor FP8 weights, static or dynamic activations."""
    config = {"quant_method": "fp8", "ignored_layers": [*recipe.ignore, *routers],
              "activation_scheme": "dynamic" if recipe.input_activations.dynamic else "static"}
    if recipe.kv_cache_scheme is not None:
        config["kv_cache_scheme"] = "static"
    return config


def config(source: dict, recipe, routers: list = ()) -> dict:
    """config.json: the source's, normalised, with AutoFP8's quantization_config."""
    return {**dense.normalised(source, recipe), "quantization_config": quantization_config(recipe, routers)}
