"""Reference vectors for the on-device quantizers, from the runtimes' own code: tests/reference/*.json,
which tests/test_ggml.py, tests/test_affine.py and tests/test_mlx_modes.py hold builder/quant/ggml.py,
affine.py and mlxfp.py to, bit for bit.

    # llama.cpp's ggml-quants.c (from the llama-cpp-python sdist), built the way ggml-base is built:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python bench/reference_vectors.py ggml llama_cpp_python-0.3.36/vendor/llama.cpp      # numpy + gcc
    /work/venvs/mlx/bin/python bench/reference_vectors.py mlx                           # mlx 0.32.4
    /work/venvs/mlx/bin/python bench/reference_vectors.py mlx-modes                     # mxfp4, nvfp4, mxfp8

Needs only numpy (and mlx for `mlx`); inputs are seeded and stored with the expected bytes, so the
tests need neither the runtimes nor the seed.
"""

import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "reference"
# ggml-quants.c links alone with these few stand-ins (only Q4_0 and Q8_0 are called).
STUB = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
size_t ggml_type_size(int type) { return type == 2 ? 18 : type == 8 ? 34 : 0; }
size_t ggml_row_size(int type, int64_t ne) { return ggml_type_size(type) * (size_t)(ne / 32); }
const char * ggml_type_name(int type) { return type == 2 ? "q4_0" : "q8_0"; }
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
"""


def hexed(array: np.ndarray) -> str:
    return np.ascontiguousarray(array).tobytes().hex()


def weights(rows: int, columns: int, seed: int) -> np.ndarray:
    """Rows of different scales, with the corner cases the quantizers branch on."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, columns)) * rng.uniform(0.005, 0.2, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0                               # an all-zero block / group
    x[1, :32] = 0.25                              # a constant one
    x[2, :] = np.abs(x[2, :])                     # all positive: the max is the edge
    x[3, :] = -np.abs(x[3, :])                    # all negative: the min is
    x[4, 5] = 3.0                                 # an outlier
    x[5, :64] = np.round(x[5, :64] * 64) / 64     # values on a grid: rounding ties
    return x


def ggml(source: Path) -> dict:
    """Q8_0, Q4_0 and importance-weighted Q4_0 bytes from llama.cpp's C code."""
    quants = source / "ggml" / "src" / "ggml-quants.c"
    with tempfile.TemporaryDirectory() as work:
        stub, library = Path(work) / "stub.c", Path(work) / "libq.so"
        stub.write_text(STUB)
        # as CMake builds ggml-base: -O3, no -march (so no FMA contraction on x86-64)
        subprocess.run(["gcc", "-O3", "-std=gnu11", "-shared", "-fPIC", f"-I{source / 'ggml' / 'include'}",
                        f"-I{source / 'ggml' / 'src'}", str(quants), str(stub), "-o", str(library), "-lm"], check=True)
        lib = ctypes.CDLL(str(library))
        x = weights(8, 256, seed=15)
        importance = (np.random.default_rng(16).gamma(1.0, 1.0, 256) ** 2).astype(np.float32)
        importance[7] = 0.0  # an input never seen
        cases = {"Q8_0": (8, 34, None), "Q4_0": (2, 18, None), "Q4_0-imatrix": (2, 18, importance)}
        found = {"input": hexed(x), "shape": list(x.shape), "importance": hexed(importance), "expected": {}}
        for name, (code, size, qw) in cases.items():
            out = np.zeros((x.shape[0], x.shape[1] // 32 * size), np.uint8)
            function = lib.quantize_q8_0 if code == 8 else lib.quantize_q4_0
            function.restype = ctypes.c_size_t
            function(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                     ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]),
                     None if qw is None else qw.ctypes.data_as(ctypes.c_void_p))
            found["expected"][name] = hexed(out)
    found["source"] = "llama.cpp ggml/src/ggml-quants.c (llama-cpp-python 0.3.36 sdist), gcc -O3 -std=gnu11"
    return found


def mlx() -> dict:
    """mx.quantize (affine) of one input in float32 and bfloat16, 4 and 8 bits, groups 32 and 128."""
    import mlx.core as mx

    x = weights(8, 128, seed=15)
    found = {"input": hexed(x), "shape": list(x.shape), "cases": [],
             "source": f"mlx {mx.__version__} mx.quantize(mode='affine') on the CPU"}
    for dtype in ("float32", "bfloat16"):
        values = mx.array(x).astype(getattr(mx, dtype))
        for bits in (4, 8):
            for group_size in (32, 128):
                packed, scales, biases = mx.quantize(values, group_size=group_size, bits=bits)
                found["cases"].append({
                    "dtype": dtype, "bits": bits, "group_size": group_size,
                    "packed": hexed(np.array(packed)),
                    "scales": hexed(np.array(scales.astype(mx.float32))),
                    "biases": hexed(np.array(biases.astype(mx.float32)))})
    return found


SWEEP = (0x3380, 0x4080)  # bfloat16 bit patterns of 2**-24 and 2**6


def mode_weights() -> np.ndarray:
    """weights() in groups of 16 and 32, with the groups mlx's float modes branch on: tiny ones (an NVFP4
    scale that rounds to 0 or to an E4M3 subnormal), and maxima at, just under and just over 6 x 2**k
    and 448 x 2**k (where the E8M0 exponent is rounded up)."""
    x = weights(16, 128, seed=23)
    x[6, :16] = np.float32(1e-4) * np.sign(x[6, :16])          # NVFP4 scale -> 0
    x[6, 16:32] = np.float32(2e-3) * np.sign(x[6, 16:32])      # NVFP4 scale -> E4M3 subnormal
    x[6, 32:48] = -x[6, 32:48]                                  # a negative maximum
    x[6, 64:96] = np.float32(-0.0)                              # signed zeros
    edges = [np.float32(base * 2.0 ** k) for base in (6.0, 448.0) for k in range(-12, -2)]
    around = [np.nextafter(e, np.float32(0)) for e in edges] + edges + [np.nextafter(e, np.float32(1)) for e in edges]
    flat = x[7:16].reshape(-1, 16)
    for row, value in enumerate(around[: len(flat)]):
        flat[row, 3] = value * (1 if row % 2 else -1)
    x[7:16] = flat.reshape(9, 128)
    return x


def mlx_modes() -> dict:
    """mx.quantize in modes mxfp4, nvfp4 and mxfp8 of one input in float32, bfloat16 and float16, and
    the scales of every bfloat16 group maximum from 2**-24 to 2**6 (where rounding the scale decides)."""
    import mlx.core as mx

    x = mode_weights()
    found = {"input": hexed(x), "shape": list(x.shape), "cases": [], "sweeps": [],
             "source": f"mlx {mx.__version__} mx.quantize(mode=...) on the CPU"}
    for mode, group_size, bits in (("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)):
        for dtype in ("float32", "bfloat16", "float16"):
            packed, scales = mx.quantize(mx.array(x).astype(getattr(mx, dtype)), group_size=group_size, bits=bits,
                                         mode=mode)
            found["cases"].append({"mode": mode, "dtype": dtype, "bits": bits, "group_size": group_size,
                                   "packed": hexed(np.array(packed)), "scales": hexed(np.array(scales))})
        # every bfloat16 value in [2**-24, 2**6) as a group's maximum
        maxima = (np.arange(*SWEEP, dtype=np.uint32) << 16).view(np.float32)
        sweep = np.zeros((len(maxima), group_size), np.float32)
        sweep[:, 0] = maxima
        _, scales = mx.quantize(mx.array(sweep).astype(mx.bfloat16), group_size=group_size, bits=bits, mode=mode)
        found["sweeps"].append({"mode": mode, "dtype": "bfloat16", "bits": bits, "group_size": group_size,
                                "bfloat16_bits": list(SWEEP), "scales": hexed(np.array(scales))})
    return found


def main(argv: list) -> None:
    kind = argv[0]
    document = ggml(Path(argv[1])) if kind == "ggml" else mlx_modes() if kind == "mlx-modes" else mlx()
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{ {'ggml': 'ggml_blocks', 'mlx-modes': 'mlx_modes'}.get(kind, 'mlx_affine')}.json"
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(OUT.parent.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
