"""The artifact_id: one hash over everything that decides an artifact's bytes, known before building. Pure.

    artifact_id = sha256(canonical JSON of {spec, inputs: {weights, data, toolchain, versions}})

Not the builder's source code: a refactor that writes the same bytes must not rebuild anything.
What the code decides is named by OUTPUT_VERSIONS, one integer per part that writes bytes; a release
carries the versions (and the toolchain packages) of the parts it runs. tests/test_golden.py holds
the bytes of every part on tiny models against a committed table keyed by these versions, so a change
of bytes without a bump fails, and names the parts to look at.
"""

from functools import cache
from importlib import metadata
from pathlib import Path

from builder import formats
from builder.canonical import canonical_json, file_entries, sha256_bytes, sha256_file, tree_digest
from builder.errors import BuilderError, Problem
from builder.paths import PACKAGE_DIR, SCHEMAS_DIR, inside
from builder.release import fused
from builder.release.recipe import Recipe

# Bump a part's number in the change that alters what it writes (the golden test says which).
OUTPUT_VERSIONS = {
    "layout": 1,                     # safetensors shards and index, config.json, tokenizer and side files
    "release-files": 4,              # release.json, serve.json, README.md, provenance.json, manifest.json (2: memory estimate counts biases; 3: provenance build type v3; 4: FP8/E8M0 scales at one byte)
    "math": 3,                       # CPU math settings every build applies (determinism.py; 2: MKL_CBWR=AVX2,STRICT moved eval.json's last digits; 3: COMPATIBLE, the same bits on AMD CPUs)
    **formats.versions(),            # format.<name>: each format module's VERSION (builder/formats/)
    "quantize.float": 1,             # FP8 scales and rounding (weights, activation and KV-cache scales)
    "quantize.int": 1,               # INT8 / INT4 scales and rounding
    "quantize.fp8-block": 1,         # FP8 weights with one scale per 2-D block (quant/blocks.py)
    "quantize.nvfp4": 3,             # NVFP4: E2M1 codes, FP8 group-16 scales, FP32 global scales (quant/fp4.py); 2: every gate/up pair under one parent (experts, shared experts) shares its global scale; 3: q/k/v and MLA's q_a/kv_a share theirs in families without a row too
    "quantize.mx": 1,                # OCP MX: E8M0 group-32 exponents, E2M1 codes or FP8 values (quant/mx.py)
    "quantize.ggml": 1,              # llama.cpp's Q8_0 / Q4_0 blocks
    "quantize.kquant": 1,            # llama.cpp's Q4_K / Q5_K / Q6_K and Q5_0 / Q5_1 blocks (plain and imatrix-weighted)
    "quantize.affine": 1,            # MLX's affine groups: scales, biases, codes
    "quantize.mlxfp": 1,             # MLX's float modes mxfp4, nvfp4, mxfp8: uint8 scales, codes (quant/mlxfp.py)
    "gptq": 5,                       # GPTQ's column loop (integer, FP8, FP4 weights); 2: MKL_CBWR; 3: Cholesky + trtri; 4: Babai (no inverse); 5: panels of 16
    "gptq.asymmetric": 1,            # GPTQ's targets moved to the source model's outputs (quant/asymmetric.py)
    "observer.mse": 1,               # weight scales searched for the least rounding error
    "observer.imatrix_mse": 1,       # the same, errors weighted by the inputs' E[x²] per column
    "smoothing": 1,                  # SmoothQuant: per-channel factors folded into each layer's norms and Linears
    "awq": 1,                        # AWQ-style activation-aware factors searched on GPTQ's Hessians, folded the same way
    "imatrix": 1,                    # llama.cpp's importance-weighted Q4_0 scale search
    "calibration": 1,                # layer-by-layer activation and KV maxima, GPTQ's and imatrix's input statistics
    "data": 1,                       # token windows drawn from calibration and evaluation text
    "evaluation": 1,                 # eval.json: perplexity and KL against the source
    "tasks": 1,                      # eval.json's tasks: lm-eval scores of artifact and source, recovery
    "import.gguf": 1,                # builder import: GGUF -> BF16 safetensors
    "import.hf": 1,                  # builder import: files copied from a Hugging Face snapshot
    "import.delta": 1,               # builder import: base + delta
    "import.quantized": 1,           # builder import: a quantized checkpoint dequantized (source/dequantize.py)
    "experts.split": 1,              # fused experts written one Linear per expert (formats/experts.py)
}
# Installed packages whose versions can change what a part writes (pinned exactly in pyproject.toml).
PART_PACKAGES = {
    "layout": ("torch",),
    "release-files": ("pyyaml",),    # the card's front matter
    "math": (),                      # environment variables only (torch's version is named by the parts that compute)
    **formats.packages(),            # format.<name>: each format module's PACKAGES
    "quantize.float": ("torch",),
    "quantize.int": ("torch",),
    "quantize.fp8-block": ("torch",),
    "quantize.nvfp4": ("torch",),
    "quantize.mx": ("torch",),
    "quantize.ggml": ("torch",),
    "quantize.kquant": ("torch",),
    "quantize.affine": ("torch",),
    "quantize.mlxfp": ("torch",),
    "gptq": ("torch",),
    "gptq.asymmetric": ("torch",),
    "observer.mse": ("torch",),
    "observer.imatrix_mse": ("torch",),
    "imatrix": ("torch",),
    "smoothing": ("torch",),
    "awq": ("torch",),
    "calibration": ("torch", "transformers"),  # the model's own decoder layers run
    "data": ("tokenizers", "transformers"),    # text -> token ids
    "evaluation": ("compressed-tensors", "safetensors", "torch", "transformers"),  # loads and runs both models
    "tasks": ("datasets", "lm-eval", "torch", "transformers"),  # lm-eval's requests and scoring over local JSON
    "import.gguf": ("gguf", "safetensors", "tokenizers", "torch", "transformers"),
    "import.delta": ("torch",),
    "import.quantized": ("torch",),
    "experts.split": ("torch",),
}
# Packages a build imports whose versions cannot change an artifact's bytes, and why. A package a
# build imports must be here or in PART_PACKAGES (tests/test_identity.py runs a build and checks).
INERT_PACKAGES = {
    "quant-release-builder": "the builder itself: the output versions of its parts are in the id",
    **dict.fromkeys(("hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml", "jsonschema",
                     "jsonschema-specifications", "referencing", "rpds-py", "attrs"),
                    "composition and validation: the resolved spec they produce is hashed itself"),
    **dict.fromkeys(("tqdm", "rich", "pygments", "colorama", "click", "loguru"), "progress and log output"),
    **dict.fromkeys(("huggingface-hub", "filelock", "fsspec", "httpx", "httpcore", "h11", "anyio", "certifi",
                     "idna", "hf-xet", "requests", "urllib3", "charset-normalizer", "sniffio"),
                    "file and hub access (no network at build time; every file read is pinned by digest)"),
    **dict.fromkeys(("packaging", "setuptools", "typing-extensions", "typing-inspection", "annotated-types",
                     "pydantic", "pydantic-core", "psutil", "protobuf"),
                    "typing, version parsing, configuration objects, system queries"),
    **dict.fromkeys(("sympy", "mpmath", "networkx", "jinja2", "markupsafe", "pydot"),
                    "torch's compiler and graph tooling, not eager arithmetic"),
    "numpy": "byte views of tensors for writing files (no arithmetic)",
    "accelerate": "how transformers places weights while loading, not their values",
    "regex": "imported by transformers; token ids come from the tokenizers package",
    "pillow": "imported by transformers when installed (image processors); text models never call it",
    # Installed with the tasks extra; transformers imports scikit-learn (and so scipy, pandas, ...) whenever it
    # is present. The scores the tasks part gates on are lm-eval's own means of per-item log-likelihood
    # comparisons (acc, acc_norm); a gate on an sklearn-computed metric (f1, mcc) would need scikit-learn in
    # PART_PACKAGES["tasks"].
    **dict.fromkeys(("scikit-learn", "scipy", "joblib", "threadpoolctl", "narwhals", "pandas", "pyarrow",
                     "python-dateutil", "pytz", "six", "cloudpickle", "dill", "multiprocess", "xxhash"),
                    "imported by transformers, datasets or lm-eval when installed: file reading, caching, metric "
                    "registries; no arithmetic on weights or on the gated task scores"),
    **dict.fromkeys(("sacrebleu", "lxml", "portalocker", "tabulate", "chardet", "wcwidth"),
                    "lm-eval's metric and table modules, imported when it loads: BLEU-type metrics no shipped task "
                    "gates on, and printing"),
}
# What a release's lock (and so its id) records, besides the spec.
INPUT_KEYS = ("weights", "data", "toolchain", "versions")


def parts(spec: dict) -> tuple:
    """The parts of the builder a release runs, sorted."""
    found = {"layout", "release-files", "math", *Recipe.of(spec["quant"]).parts}
    if fused.split_on_write(spec["model"]["architecture"]["class"], Recipe.of(spec["quant"])):
        found.add("experts.split")  # a quantized Llama 4, Granite 4, gpt-oss: its experts split (no other runs it)
    if spec["calibration"]["dataset"] is not None and "calibration" in found:
        found.add("data")
    if spec["eval"]["dataset"] is not None:
        found |= {"evaluation", "data"}
    if spec["eval"].get("tasks"):
        found.add("tasks")
    return tuple(sorted(found))


def versions(names) -> dict:
    """part -> output version, for the parts named (a format's as its module says now: the registry's)."""
    table = {**OUTPUT_VERSIONS, **formats.versions()}
    return {name: table[name] for name in sorted(names)}


def toolchain(names) -> dict:
    """package -> installed version, for the packages the parts named depend on."""
    table = {**PART_PACKAGES, **formats.packages()}
    packages = sorted({package for name in names for package in table.get(name, ())})
    missing = [package for package in packages if installed(package) is None]
    if missing:  # e.g. lm-eval for a release with tasks, where the `tasks` extra is not installed
        raise BuilderError([Problem("pyproject.toml", package, "not installed, and a part this release runs depends on "
                                    "it (pip install -e '.[tasks]' for lm-eval and datasets)") for package in missing])
    return {package: installed(package) for package in packages}


@cache  # installed versions do not change under a running process; `lock` asks once per release
def installed(package: str) -> str:
    """A package's installed version, read from its metadata (no import); None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def import_inputs(kind: str) -> dict:
    """What `builder import` of a source kind depends on: its version and its toolchain (params.yaml)."""
    part = f"import.{kind}"
    return {"versions": versions([part]), "toolchain": toolchain([part])} if part in OUTPUT_VERSIONS else {}


def data_digests(root: Path, spec: dict, release_file: str) -> dict:
    """sha256 of every data file the spec names (calibration, evaluation), by repository path."""
    digests = {}
    for group in ("calibration", "eval"):
        relative = spec[group]["dataset"]
        if relative is None:
            continue
        path = inside(root, relative, file=release_file, key=f"{group}.dataset")
        if not path.is_file():
            raise BuilderError(Problem(f"specs/{group}/{spec['choices'][group]}.yaml",
                                       f"{group}.dataset", f"{relative!r}: no such file"))
        digests[relative] = sha256_file(path)
    for relative in task_files(root, spec["eval"].get("tasks") or [], f"specs/eval/{spec['choices']['eval']}.yaml"):
        digests[relative] = sha256_file(inside(root, relative, file=release_file, key="eval.tasks.config"))
    return digests


def task_data_files(config: dict) -> dict:
    """split -> the data file a local lm-eval task config names, relative to the config's folder."""
    named = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return {"train": named} if isinstance(named, str) else dict(sorted(named.items()))


def task_files(root: Path, tasks: list, file: str) -> list:
    """Repository paths of every file the local tasks read (configs and their data), sorted."""
    import yaml

    found = set()
    for task in tasks:
        if task["config"] is None:  # lm-eval's own task: its data comes from the hub, pinned by lm-eval's version
            continue
        path = inside(root, task["config"], file=file, key="eval.tasks.config")
        if not path.is_file():
            raise BuilderError(Problem(file, "eval.tasks.config", f"{task['config']!r}: no such file"))
        found.add(task["config"])
        for relative in task_data_files(yaml.safe_load(path.read_text(encoding="utf-8")) or {}).values():
            found.add((Path(task["config"]).parent / relative).as_posix())
    return sorted(found)


def inputs(root: Path, spec: dict) -> dict:
    """Everything besides the spec that decides the artifact's bytes (INPUT_KEYS)."""
    release_file = f"specs/release/{spec['choices']['release']}.yaml"
    used = parts(spec)
    return {
        "weights": {"path": spec["model"]["path"], "digest": spec["model"]["digest"]},
        "data": data_digests(root, spec, release_file),
        "toolchain": toolchain(used),
        "versions": versions(used),
    }


def artifact_id(spec: dict, build_inputs: dict) -> str:
    """sha256 of the canonical JSON of {spec, inputs}: known before anything is built."""
    return sha256_bytes(canonical_json({"spec": spec, "inputs": build_inputs}))


def holds(entry: dict) -> bool:
    """Whether a lock entry's (or an artifact's recorded) spec and inputs hash to its artifact_id."""
    return artifact_id(entry["spec"], entry["inputs"]) == entry["artifact_id"]


@cache  # the builder's files do not change under a running process
def builder_digest() -> str:
    """Digest of the builder's own source files and schemas: who built an artifact (provenance,
    audit), not what it is (the artifact_id)."""
    entries = []
    for base, prefix in ((PACKAGE_DIR, "builder"), (SCHEMAS_DIR, "schemas")):
        for entry in file_entries(base):
            if entry["path"].endswith((".py", ".json", ".yaml")) and "__pycache__" not in entry["path"]:
                entries.append({**entry, "path": f"{prefix}/{entry['path']}"})
    return tree_digest(entries)

