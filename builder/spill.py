"""GPTQ's results spilled to disk as each layer finishes, read back one module at a time by the writer:
memory holds one layer's integer weights, whatever the number of layers.

    spill = Spill(folder); spill.put(layer, {module: (values, scale)}); spill.get(module) -> (values, scale)
    (NVFP4: (codes, scale, global_scale) in and out)
"""

from pathlib import Path

from builder import tensorfile
from builder.tensorfile import Output


PARTS = ("values", "scale", "global_scale")  # NVFP4's results carry the third


class Spill:
    """A mapping module -> (integer weights, scales), kept in one safetensors file per decoder layer."""

    def __init__(self, folder: Path):
        self.folder, self.index = folder, {}

    def put(self, layer: int, results: dict) -> None:
        if not results:
            return
        tensors = {f"{module}.{part}": tensor.detach().cpu().contiguous()
                   for module, pair in results.items() for part, tensor in zip(PARTS, pair)}
        file = self.folder / f"gptq-{layer:05d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        tensorfile.write(file, [Output(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], tensors.pop)
        for module in results:
            self.index[module] = file

    def get(self, module: str, default=None):
        file = self.index.get(module)
        if file is None:
            return default
        index = tensorfile.index_of([file])
        with tensorfile.reader(index) as read:
            return tuple(read(f"{module}.{part}") for part in PARTS if f"{module}.{part}" in index)

    def __contains__(self, module: str) -> bool:
        return module in self.index
