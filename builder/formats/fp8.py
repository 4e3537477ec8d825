"""Format fp8: the AutoFP8 / vLLM `quant_method: fp8` legacy layout. FP8 per-tensor weights with F32
scalar scales (`weight_scale`, `input_scale` for static activations, a KV projection's `output_scale`),
config.json's quantization_config as AutoFP8 writes it; or FP8 block-wise weights as DeepSeek-V3 ships
them (`weight_scale_inv` F32 [ceil(rows/128), ceil(columns/128)], the factor that multiplies the FP8
values back, `weight_block_size` in the config, activations dynamic). Rounded as compressed-tensors rounds.

    builder build smollm2-135m-instruct-fp8-static quant.format=fp8
"""

from pathlib import Path

from builder.formats import compressed_tensors, dense
from builder.tensorfile import Output

VERSION = 1            # the AutoFP8 / vLLM legacy layout
PACKAGES = ()
QUANTIZER = None       # compressed-tensors' arithmetic: quantize.float
FAMILIES = None
CONTAINER = ".safetensors"
LIBRARY = "transformers"
VLLM = "fp8"
SCALES = ("_scale", "_scale_inv")  # weight_scale, input_scale, output_scale, k_scale, v_scale; weight_scale_inv
BLOCK_SCALE = "weight_scale_inv"  # vLLM's Fp8LinearMethod registers block scales under this name (DeepSeek-V3's)


def problems(recipe, rules) -> list:
    """compressed-tensors' rules, and what the layout holds: FP8 per-tensor weights and activations, or
    FP8 block-wise weights (their activations per token-group, checked by the rules)."""
    found = compressed_tensors.problems(recipe, rules)
    weights, acts = recipe.weights, recipe.input_activations
    per_tensor = weights is not None and (weights.type, weights.strategy) == ("float", "tensor") and \
        acts is not None and acts.type == "float" and acts.strategy == "tensor"
    if weights is not None and not (per_tensor or block(recipe)):
        found.append((("quant", "format"), "fp8: the legacy layout holds FP8 per-tensor weights and FP8 "
                      "per-tensor activations (static or dynamic), or FP8 block-wise weights (strategy block) "
                      "with dynamic activations; use compressed-tensors otherwise"))
    if block(recipe) and recipe.kv_cache_scheme is not None:
        found.append((("quant", "kv_cache_scheme"), "fp8: the block-wise legacy layout is written without "
                      "KV-cache scales; use compressed-tensors for an FP8 KV cache"))
    return found


def block(recipe) -> bool:
    """Whether the recipe's weights are FP8 blocks (weight_block_size, weight_scale_inv)."""
    return recipe.weights is not None and recipe.weights.strategy == "block"


def block_names(found, recipe):
    """compressed-tensors' tensors (Outputs, or a name -> tensor dict) with block scales under vLLM's name."""
    if not block(recipe):
        return found
    suffix = "." + BLOCK_SCALE.removesuffix("_inv")
    if isinstance(found, dict):
        return {name.removesuffix(suffix) + "." + BLOCK_SCALE if name.endswith(suffix) else name: tensor
                for name, tensor in found.items()}
    return [Output(item.name.removesuffix(suffix) + "." + BLOCK_SCALE, item.dtype, item.shape)
            if item.name.endswith(suffix) else item for item in found]


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
    return block_names(compressed_tensors.outputs(name, dtype, shape, targeted, recipe, kv, scale_format(recipe)),
                       recipe)


def known(name: str, shape: tuple, targeted: bool, recipe, calibration, kv: list, arithmetic) -> dict:
    return compressed_tensors.known_outputs(name, shape, targeted, recipe, calibration, kv, arithmetic,
                                            scale_format(recipe))


def compute(name: str, tensor, recipe, arithmetic) -> dict:
    return block_names(compressed_tensors.computed(name, tensor, recipe, arithmetic, scale_format(recipe)), recipe)


def quantization_config(recipe, routers: list = ()) -> dict:
    """The AutoFP8 / vLLM `quant_method: fp8` config: per-tensor FP8 weights, static or dynamic activations;
    block-wise weights add `weight_block_size` [rows, columns] (vLLM's Fp8Config.from_config reads
    quant_method, activation_scheme, ignored_layers and weight_block_size)."""
    config = {"quant_method": "fp8", "ignored_layers": [*recipe.ignore, *routers],
              "activation_scheme": "dynamic" if recipe.input_activations.dynamic else "static"}
    if block(recipe):
        config["weight_block_size"] = list(recipe.weights.block_structure)
    if recipe.kv_cache_scheme is not None:
        config["kv_cache_scheme"] = "static"
    return config


def config(source: dict, recipe, routers: list = ()) -> dict:
    """config.json: the source's, normalised, with AutoFP8's quantization_config."""
    return {**dense.normalised(source, recipe), "quantization_config": quantization_config(recipe, routers)}
