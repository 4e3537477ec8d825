"""Format compressed-tensors: quantization_config is written as data, and must equal what
compressed-tensors' own models make of it."""

import pytest

from builder.formats import compressed_tensors
from builder.release.recipe import OBSERVERS, Recipe
from builder.release.resolve import resolve
from conftest import PROJECT

SHIPPED_RELEASES = sorted(p.stem for p in (PROJECT / "specs" / "release").glob("*.yaml"))


def compressed_tensors_dump(quant: dict) -> dict:
    """The config compressed-tensors' pydantic models produce for a recipe (what vLLM parses)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(values, **extra):
        if values is None:
            return None
        values = dict(values)
        observer, settings = values.pop("observer", "minmax"), values.pop("observer_kwargs", {})
        if observer != "minmax":  # minmax is compressed-tensors' default for static weights (memoryless_minmax)
            extra.update(observer=observer, observer_kwargs={**OBSERVERS[observer], **settings})
        if values["dynamic"] == "local":  # NVFP4 activations: the preset's observer (its default would be minmax)
            extra.update(observer="static_minmax")
        return QuantizationArgs(**values, **extra)

    order = {"actorder": quant["gptq"]["actorder"]} if quant["algorithm"] == "gptq" else {}
    scheme = QuantizationScheme(targets=list(quant["targets"]), weights=args(quant["weights"], **order),
                                input_activations=args(quant["input_activations"]))
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=Recipe.of(quant).compression_format,
                                quantization_status="compressed", ignore=list(quant["ignore"]),
                                kv_cache_scheme=args(quant["kv_cache_scheme"]))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}


@pytest.mark.parametrize("release", SHIPPED_RELEASES)
def test_quantization_config_equals_what_compressed_tensors_writes_for_every_shipped_release(release):
    quant = resolve(PROJECT, release)["quant"]
    if quant["format"] != "compressed-tensors":
        pytest.skip(f"{release} is {quant['format']}: no compressed-tensors config")
    assert compressed_tensors.quantization_config(Recipe.of(quant)) == compressed_tensors_dump(quant)


@pytest.mark.parametrize("release, overrides", [
    ("smollm2-135m-instruct-w8a8-int8", ("quant.weights.strategy=tensor",)),
    ("smollm2-135m-instruct-fp8-static", ("quant.kv_cache_scheme=null",)),
    ("smollm2-135m-instruct-w4a16", ("quant.weights.group_size=32",)),
    ("smollm2-135m-instruct-fp8-dynamic", ("quant.ignore=[lm_head,re:.*down_proj]",)),
    ("smollm2-135m-instruct-fp8-dynamic", ("+quant.weights.observer=mse",)),
    ("smollm2-135m-instruct-w4a16", ("+quant.weights.observer=minmax",)),
    ("smollm2-135m-instruct-fp8-static", ("+quant.weights.observer=imatrix_mse",
                                          "+quant.weights.observer_kwargs={norm:2.0,patience:0}")),
    ("smollm2-135m-instruct-w4a16-gptq", ("+quant.weights.observer=imatrix_mse",
                                          "+quant.weights.observer_kwargs={grid:40}"))])
def test_quantization_config_equals_compressed_tensors_for_recipe_variations(release, overrides):
    quant = resolve(PROJECT, release, overrides)["quant"]
    assert compressed_tensors.quantization_config(Recipe.of(quant)) == compressed_tensors_dump(quant)


def test_quantization_config_validates_as_compressed_tensors_config():
    from compressed_tensors.quantization import QuantizationConfig

    quant = resolve(PROJECT, "smollm2-135m-instruct-fp8-static")["quant"]
    written = compressed_tensors.quantization_config(Recipe.of(quant))
    parsed = QuantizationConfig.model_validate(written)
    assert parsed.kv_cache_scheme.num_bits == 8 and parsed.format == "float-quantized"
