"""mlx-lm's own converter against our MLX artifacts: `mlx_lm.convert -q --q-mode MODE` of the same source
checkpoint, and every Linear our artifact quantizes compared with mlx-lm's, tensor by tensor (weight, scales,
biases: dtype, shape and every value). Run in the mlx venv, from the repository root (results: BENCHMARKS.md):

    /tmp/venv-mlx/bin/python bench/mlx_convert_check.py weights/smollm2-135m-instruct \
        artifacts/smollm2-135m-instruct-mlx-mxfp4 artifacts/smollm2-135m-instruct-mlx-nvfp4 ...

mlx-lm also quantizes the embeddings (our recipes keep them in BF16): only the tensors ours holds quantized
are compared.
"""

import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm import convert


def tensors(folder: Path) -> dict:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(mx.load(str(path)))
    return found


def check(source: Path, artifact: Path) -> dict:
    """Our quantized Linears' tensors against those mlx_lm.convert writes for the artifact's mode."""
    block = json.loads((artifact / "config.json").read_text())["quantization"]
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "converted"
        convert(str(source), mlx_path=str(out), quantize=True, q_group_size=block["group_size"], q_bits=block["bits"],
                q_mode=block["mode"])
        theirs = tensors(out)
    ours = tensors(artifact)
    modules = sorted(name[: -len(".scales")] for name in ours if name.endswith(".scales"))
    names = [f"{module}.{part}" for module in modules for part in ("weight", "scales", "biases")
             if f"{module}.{part}" in ours or f"{module}.{part}" in theirs]
    differ = [name for name in names if name not in ours or name not in theirs or ours[name].dtype != theirs[name].dtype
              or ours[name].shape != theirs[name].shape or not mx.array_equal(ours[name], theirs[name]).item()]
    return {"artifact": artifact.name, **block, "linears": len(modules), "tensors": len(names),
            "identical": len(names) - len(differ), "differ": differ[:5]}


if __name__ == "__main__":
    source, *artifacts = map(Path, sys.argv[1:])
    for artifact in artifacts:
        print(json.dumps(check(source, artifact)), flush=True)
