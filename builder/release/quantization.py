"""The quant group's typed models, with compressed-tensors' names: QuantizationArgs and the recipe's
settings. Pure. Extra keys are refused; builder/release/schema.py writes the JSON Schema from them.

    Args.of({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
             "dynamic": False, "group_size": None}).words()    # 'fp8, channel, symmetric, static scales'
"""

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from builder import formats

from builder.formats.kmix import PRESETS as GGML_MIXES

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP4_MAX = 6.0    # largest FP4 E2M1 value
# Weight scale search (builder/quant/observe.py), compressed-tensors' `observer` names, with the
# observer_kwargs each takes and their defaults. minmax is the plain max |w| (no search).
OBSERVERS = {
    "minmax": {},
    "mse": {"grid": 100, "maxshrink": 0.2, "patience": 5, "norm": 2.4},
    "imatrix_mse": {"grid": 20, "maxshrink": 0.95, "patience": 5, "norm": 3.0},
}
JSON_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


class Group(BaseModel):
    """A part of the spec: strict types (no coercion), no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, regex_engine="python-re")

    @classmethod
    def of(cls, data):
        """Validate plain data (JSON types, as Hydra and the lock hold them)."""
        return cls.model_validate_json(json.dumps(data))

    def data(self) -> dict:
        """The plain data it was made of: keys the input left out stay out (so bytes round-trip)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def number(description: str | None = None, **bounds):
    """A JSON number kept as given (an int stays an int, so canonical bytes round-trip), with bounds."""
    schema = {"type": "number", **{JSON_BOUNDS[key]: value for key, value in bounds.items()}}
    return Annotated[int | float, Field(description=description, **bounds),
                     WithJsonSchema({**schema, **({"description": description} if description else {})})]


def unique(items: list) -> list:
    if len(set(items)) != len(items):
        raise ValueError("has repeated items")
    return items


def unique_list(item, min_length: int = 0, description: str | None = None):
    """A list of distinct items (JSON Schema uniqueItems)."""
    return Annotated[list[item], Field(min_length=min_length, description=description,
                                       json_schema_extra={"uniqueItems": True}), AfterValidator(unique)]


def registered(value: str) -> str:
    """An output format of the registry (builder/formats/), asked when a spec is validated, so a format
    module registered there is a valid quant.format with no edit here."""
    if value not in formats.FORMATS:
        raise PydanticCustomError("literal_error", "not a registered output format")
    return value


# quant.format and a target's formats: the registry's names (the schema lists them when it is written).
Format = Annotated[str, AfterValidator(registered),
                   Field(json_schema_extra=lambda schema: schema.update(enum=list(formats.FORMATS)))]
Positive = Annotated[int, Field(ge=1)]
ModulePattern = Annotated[str, Field(min_length=1)]


class ObserverKwargs(Group):
    """The observer's search settings (optional; absent ones take the observer's defaults)."""

    grid: Positive | None = Field(None, description="candidate ratios p = 1 - i/grid")
    maxshrink: number("smallest ratio tried is 1 - maxshrink", gt=0, lt=1) | None = None
    patience: Annotated[int, Field(ge=0)] | None = Field(
        None, description="a scale stops searching after this many ratios in a row that did not lower its error; "
                          "0: try every ratio")
    norm: number("exponent of |error|", gt=0) | None = None


class Args(Group):
    """compressed-tensors' QuantizationArgs, the fields this builder reads, with its names."""

    model_config = ConfigDict(title="QuantizationArgs", json_schema_extra={
        "description": "compressed-tensors QuantizationArgs, with its names."})

    num_bits: Literal[4, 5, 8]  # 5: llama.cpp's Q5_K (format gguf, ggml_mix Q5_K_M) only
    type: Literal["int", "float"]
    strategy: Literal["tensor", "channel", "group", "tensor_group", "block", "token"]
    symmetric: bool
    dynamic: bool | Literal["local"] = Field(description="true: scales computed at run time; false: at build "
                                             "time; local (NVFP4 activations): group scales at run time under a "
                                             "calibrated global scale")
    group_size: Positive | None
    scale_dtype: Literal["float8_e4m3fn", "uint8"] | None = Field(
        None, description="dtype scales are stored in (optional; absent: the recipe's dtype): float8_e4m3fn "
        "(NVFP4's group scales, with strategy tensor_group) or uint8 (E8M0 power-of-two exponents: MXFP4, MXFP8)")
    block_structure: Annotated[list[Positive], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[rows, columns] of a weight block sharing one scale, with strategy block (optional; "
        "absent: none), e.g. [128, 128]: compressed-tensors' FP8_BLOCK")
    observer: Literal["minmax", "mse", "imatrix_mse"] = Field(
        "minmax", description="how weight scales are chosen (optional; absent: minmax): minmax (max |w|), mse "
        "(clipping ratio minimising the rounding error), imatrix_mse (the same error weighted by the calibration "
        "inputs' E[x^2] per column)")
    observer_kwargs: ObserverKwargs | None = None

    @classmethod
    def of(cls, data: dict | None) -> "Args | None":
        return None if data is None else super().of(data)

    def as_dict(self) -> dict:
        """The fields compressed-tensors and the spec share, without the observer (see `search`)."""
        shared = {"num_bits", "type", "strategy", "symmetric", "dynamic", "group_size", "block_structure"}
        found = self.model_dump(include=shared)
        if self.scale_dtype is not None:  # compressed-tensors writes torch dtypes by their torch name
            found["scale_dtype"] = f"torch.{self.scale_dtype}"
        return found

    @property
    def microscaled(self) -> bool:
        """Power-of-two group scales stored as E8M0 exponents (OCP MX: MXFP4, MXFP8)."""
        return self.scale_dtype == "uint8"

    @property
    def part(self) -> str:
        """The part of the builder (identity.OUTPUT_VERSIONS) whose arithmetic rounds these arguments."""
        if self.strategy == "block":
            return "quantize.fp8-block"
        if self.strategy == "tensor_group":
            return "quantize.nvfp4"
        if self.microscaled:
            return "quantize.mx"
        return f"quantize.{self.type}"

    @property
    def settings(self) -> dict:
        """The observer_kwargs the spec gives (possibly none)."""
        return {} if self.observer_kwargs is None else self.observer_kwargs.data()

    @property
    def search(self) -> dict:
        """The observer's settings: its defaults (OBSERVERS) updated with the spec's observer_kwargs."""
        return {**OBSERVERS[self.observer], **self.settings}

    @property
    def value_range(self) -> tuple:
        """(q_min, q_max) of the quantized type."""
        if self.type == "float":
            return (-FP4_MAX, FP4_MAX) if self.num_bits == 4 else (-FP8_MAX, FP8_MAX)
        return -(2 ** (self.num_bits - 1)), 2 ** (self.num_bits - 1) - 1

    def scale_count(self, rows: int, columns: int) -> int:
        """Number of scales a [rows, columns] weight carries under this strategy."""
        if self.strategy == "tensor":
            return 1
        if self.strategy in ("group", "tensor_group"):
            return rows * -(-columns // self.group_size)
        if self.strategy == "block":  # partial blocks at the edges keep a scale of their own
            block_rows, block_columns = self.block_structure
            return -(-rows // block_rows) * -(-columns // block_columns)
        return rows  # channel (token is refused for weights)

    def words(self) -> str:
        """In a few words, for people: fp8, channel, symmetric, dynamic scales."""
        strategy = {"group": f"group {self.group_size}", "tensor_group": f"group {self.group_size} + tensor",
                    "block": f"block {'x'.join(map(str, self.block_structure or ()))}"}.get(self.strategy, self.strategy)
        kind = "fp" if self.type == "float" else "int"
        timing = "run-time group" if self.dynamic == "local" else "dynamic" if self.dynamic else "static"
        return (f"{kind}{self.num_bits}, {strategy}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"{timing} scales")


QuantizationArgs = Args


class GPTQ(Group):
    """llm-compressor's GPTQModifier settings the recipe fixes."""

    block_size: Positive
    dampening_frac: number(gt=0, le=1)
    actorder: Literal["static"] | None = Field(
        description="static: columns rounded in order of decreasing input energy (scales and layout unchanged); "
                    "null: in storage order")
    asymmetric: bool = Field(
        False, description="true: each layer's leading Linears (q/k/v) are fitted, on the quantized model's inputs, "
                           "to the source model's outputs on its own inputs, so the layer also makes up for the error "
                           "of the layers before it (after GPTAQ, Li et al. 2025; runs the source model beside the "
                           "calibration, one more forward pass per layer); optional, absent: false, each Linear "
                           "fitted to its source weights on the quantized inputs (GPTQ)")


class AWQ(Group):
    """AWQ-style activation-aware scaling (optional; absent: none): each decoder layer's input channels after
    its two norms multiplied in the weights, and divided in the norm, by rms(x)^alpha, alpha searched per norm
    for the least output error of the rounded weights on the calibration inputs. Calibrated; weight-only
    compressed-tensors recipes; dense families with two norms per layer."""

    grid: Annotated[int, Field(ge=2, le=100, description="alphas tried: 0, 1/grid, ..., 1 - 1/grid "
                                                          "(alpha 0 leaves the layer as it is)")]


class Smoothing(Group):
    """SmoothQuant (optional; absent: none): each decoder layer's input channels divided by
    max|x|^alpha / max|w|^(1-alpha), folded into the norm before them and the Linears after it, so
    activations quantize with less error. Calibrated; dense families with two norms per layer."""

    alpha: number("migration strength: 0 leaves activations as they are, 1 moves all their range into the "
                  "weights", gt=0, lt=1)


class Quant(Group):
    """A named recipe: output format, dtype, algorithm, targets and quantization arguments."""

    format: Format = Field(description="compressed-tensors, fp8 (the AutoFP8/vLLM legacy layout) or "
                                     "dense (Hugging Face safetensors); gguf (llama.cpp) or mlx (mlx-lm)")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        description="dtype of unquantized tensors and of scales (GGUF block scales are always F16)")
    algorithm: Literal["rtn", "gptq", "imatrix"] | None = Field(
        description="rtn (round to nearest), gptq (calibrated error compensation) or imatrix (llama.cpp's "
                    "importance-weighted Q4_0 rounding, from calibration); null when unquantized")
    gptq: GPTQ | None
    targets: list[ModulePattern] = Field(description="modules to quantize: class names, module names or "
                                         "'re:<regex>' on names (compressed-tensors' target syntax)")
    ignore: list[ModulePattern]
    weights: Args | None
    input_activations: Args | None
    kv_cache_scheme: Args | None = Field(description="FP8 KV-cache scales (k_scale, v_scale) from "
                                         "calibration; null for none")
    awq: AWQ | None = None
    smoothing: Smoothing | None = None
    ggml_mix: Literal[tuple(sorted(GGML_MIXES))] | None = Field(
        None, description="llama-quantize's preset (optional; absent: every targeted weight is the type weights "
        "names): each GGUF tensor's type as llama-quantize --ftype chooses it, K-quants where rows are a multiple "
        "of 256 values; weights then names the preset's main type (Q4_K: int4, Q5_K: int5; group 32, asymmetric)")
