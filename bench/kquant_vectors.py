"""Reference vectors for the K-quants (tests/reference/kquant_blocks.json) from llama.cpp's own C code, which
tests/test_kquants.py holds builder/quant/kquants.py to, bit for bit; and a fuzz check of the two on many
more seeded inputs than the JSON holds.

    # llama.cpp's ggml-quants.c (from the llama-cpp-python sdist), built the way ggml-base is built:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python bench/kquant_vectors.py llama_cpp_python-0.3.36/vendor/llama.cpp            # writes the JSON
    python bench/kquant_vectors.py llama_cpp_python-0.3.36/vendor/llama.cpp --fuzz 200 # compares, writes nothing

Needs numpy and gcc (the fuzz check also torch and this checkout). The C side is quantize_q4_K / q5_K / q6_K
(what llama-quantize calls through ggml_quantize_chunk: the reference quantizer without an imatrix, the
weighted one with it) and dequantize_row_q*_K; the same for Q5_0 and Q5_1, the types llama-quantize's
Q4_K_M / Q5_K_M presets fall back to for rows that are not a multiple of 256 values.
"""

import ctypes
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "reference" / "kquant_blocks.json"
TYPES = {"Q4_K": (12, 144, 256), "Q5_K": (13, 176, 256), "Q6_K": (14, 210, 256),  # ggml type id, bytes a block,
         "Q5_0": (6, 22, 32), "Q5_1": (7, 24, 32)}                                  # values a block
# ggml-quants.c links alone with these few stand-ins (only the K-quants are called).
STUB = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
size_t ggml_type_size(int type) { return type == 12 ? 144 : type == 13 ? 176 : type == 14 ? 210 : type == 6 ? 22 : 24; }
int64_t ggml_blck_size(int type) { return type == 6 || type == 7 ? 32 : 256; }
size_t ggml_row_size(int type, int64_t ne) { return ggml_type_size(type) * (size_t)(ne / ggml_blck_size(type)); }
const char * ggml_type_name(int type) { return "k-quant"; }
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
"""
# as CMake builds ggml-base in a Release build: -O3 -DNDEBUG, no -march (so no FMA contraction on x86-64)
FLAGS = ["-O3", "-DNDEBUG", "-std=gnu11", "-shared", "-fPIC"]


def hexed(array: np.ndarray) -> str:
    return np.ascontiguousarray(array).tobytes().hex()


def build(source: Path, work: Path) -> ctypes.CDLL:
    """ggml-quants.c compiled as a shared library in work."""
    stub, library = work / "stub.c", work / "libkq.so"
    stub.write_text(STUB)
    subprocess.run(["gcc", *FLAGS, f"-I{source / 'ggml' / 'include'}", f"-I{source / 'ggml' / 'src'}",
                    str(source / "ggml" / "src" / "ggml-quants.c"), str(stub), "-o", str(library), "-lm"],
                   check=True)
    return ctypes.CDLL(str(library))


def c_name(kind: str) -> str:
    """ggml-quants.c's spelling of a type in function names: q4_K, q5_0."""
    return kind[0].lower() + kind[1:]


def c_quantize(lib: ctypes.CDLL, kind: str, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """quantize_q*_K / quantize_q5_0 / q5_1 (x, rows, columns, importance): uint8 [rows, row bytes]."""
    _, size, block = TYPES[kind]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    function = getattr(lib, f"quantize_{c_name(kind)}")
    function.restype = ctypes.c_size_t
    function(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.shape[0]),
             ctypes.c_int64(x.shape[1]), None if importance is None else importance.ctypes.data_as(ctypes.c_void_p))
    return out


def c_dequantize(lib: ctypes.CDLL, kind: str, blocks: np.ndarray, columns: int) -> np.ndarray:
    """dequantize_row_<kind> over every row: FP32 [rows, columns]."""
    out = np.zeros((blocks.shape[0], columns), np.float32)
    getattr(lib, f"dequantize_row_{c_name(kind)}")(
        np.ascontiguousarray(blocks).ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(out.size))
    return out


def hard_cases(seed: int) -> np.ndarray:
    """8 rows of 512 (two super-blocks each) with the cases the quantizers branch on."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.005, 0.2, (8, 1))).astype(np.float32)
    x[0, :256] = 0.0                                  # an all-zero super-block
    x[0, 256:288] = 0.25                              # a constant sub-block beside random ones
    x[0, 288:320] = -0.5                              # a constant negative one: max == min
    x[0, 320:336] = 0.0                               # a zero Q6_K sub-block of 16 in a live block
    x[1, :256] = np.abs(x[1, :256])                   # all positive: the min is clipped to 0
    x[1, 256:] = -np.abs(x[1, 256:])                  # all negative: the max is the edge
    x[2, :256] *= 1e-6                                # tiny: scales round to small F16 subnormals
    x[2, 256:] *= 1e-30                               # tinier: F16 scales flush to zero, the search's codes stay
    x[3, :256] *= 5e4                                 # huge, still within F16 range
    x[3, 256:] *= 1e9                                 # huge: F16 scales overflow to inf
    x[4, :] *= np.repeat(np.logspace(-3, 0, 16), 32).astype(np.float32)  # sub-block scales 1000x apart
    x[4, 7] = 3.0                                     # an outlier
    x[5, :] = np.round(x[5, :] * 64) / 64             # values on a grid: rounding ties
    x[6, ::37] = 0.0                                  # scattered zeros
    x[6, 256] = 1.0                                   # one large value in an otherwise small sub-block
    return x


def importance_vector(seed: int, columns: int) -> np.ndarray:
    """An imatrix row: squared gammas, with unseen inputs (zeros), a 32-span of them, and extremes."""
    imp = (np.random.default_rng(seed).gamma(1.0, 1.0, columns) ** 2).astype(np.float32)
    imp[7] = 0.0
    imp[32:64] = 0.0                                  # a sub-block nobody fed: zero weights throughout
    imp[100] = 1e6
    imp[101] = 1e-12
    return imp


def document(lib: ctypes.CDLL) -> dict:
    """Inputs, importance, and llama.cpp's bytes (and for the hard cases its dequantized values: in full for
    the K-quants, as the sha256 of the FP32 values for Q5_0 / Q5_1, to keep the file small)."""
    hard, bulk = hard_cases(23), np.random.default_rng(24).standard_normal((12, 256)).astype(np.float32) * 0.05
    imp_hard, imp_bulk = importance_vector(25, 512), importance_vector(26, 256)
    unseen = np.random.default_rng(27).standard_normal((2, 256)).astype(np.float32) * 0.05
    inputs = {}
    for name, x, imp in (("hard", hard, imp_hard), ("bulk", bulk, imp_bulk),
                         ("unseen", unseen, np.zeros(256, np.float32))):  # an imatrix of zeros: all weights 0
        entry = {"input": hexed(x), "shape": list(x.shape), "importance": hexed(imp), "expected": {},
                 "dequantized": {}}
        for kind in TYPES:
            for weighted in (False, True):
                blocks = c_quantize(lib, kind, x, imp if weighted else None)
                entry["expected"][kind + ("-imatrix" if weighted else "")] = hexed(blocks)
                if name == "hard" and not weighted:  # the K-quants' values in full, the others' digest
                    values = c_dequantize(lib, kind, blocks, x.shape[1])
                    entry["dequantized"][kind] = (hashlib.sha256(values.tobytes()).hexdigest() if kind.endswith("_1")
                                                  or kind.endswith("_0") else hexed(values))
        inputs[name] = entry
    return {"inputs": inputs, "source": "llama.cpp ggml/src/ggml-quants.c (llama-cpp-python 0.3.36 sdist), "
                                        "gcc " + " ".join(FLAGS[:3]) + ", x86-64"}


def fuzz(lib: ctypes.CDLL, count: int) -> int:
    """Compares builder.quant.kquants with the C code on count seeded inputs; returns the mismatches."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from builder.quant import kquants

    failures = 0
    started = time.perf_counter()
    for seed in range(count):
        rng = np.random.default_rng(1000 + seed)
        x = (rng.standard_normal((4, 1024)) * rng.uniform(1e-4, 2, (4, 1))).astype(np.float32)
        x[:, :64] *= rng.uniform(0.01, 100)  # a few sub-blocks far from the rest
        if seed % 3 == 0:
            x = np.round(x * 32) / 32  # ties
        if seed % 5 == 0:
            x[:, rng.integers(0, 1024, 64)] = 0.0
        imp = (rng.gamma(0.5, 1.0, 1024) ** 2).astype(np.float32)
        for kind in TYPES:
            for weights in (None, imp):
                ours = kquants.quantize(torch.from_numpy(x), kind, None if weights is None else torch.from_numpy(weights))
                theirs = c_quantize(lib, kind, x, weights)
                if not np.array_equal(ours.numpy(), theirs):
                    failures += 1
                    rows = np.nonzero((ours.numpy() != theirs).any(axis=1))[0]
                    print(f"seed {seed} {kind} {'imatrix' if weights is not None else 'reference'}: rows {rows}")
    print(f"{count} inputs x {2 * len(TYPES)} cases, {failures} mismatches, {time.perf_counter() - started:.1f} s")
    return failures


def main(argv: list) -> None:
    source = Path(argv[0])
    with tempfile.TemporaryDirectory() as work:
        lib = build(source, Path(work))
        if "--fuzz" in argv:
            sys.exit(1 if fuzz(lib, int(argv[argv.index("--fuzz") + 1])) else 0)
        found = document(lib)
    OUT.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(OUT.parent.parent.parent)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
