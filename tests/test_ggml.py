"""llama.cpp's Q8_0 / Q4_0 blocks and importance-weighted Q4_0: the same bytes as llama.cpp's C code
(tests/reference/ggml_blocks.json, from bench/reference_vectors.py) and as the gguf package's
reference quantizers."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from builder.quant import ggml

REFERENCE = json.loads((Path(__file__).parent / "reference" / "ggml_blocks.json").read_text())


def reference_input() -> tuple:
    x = np.frombuffer(bytes.fromhex(REFERENCE["input"]), np.float32).reshape(REFERENCE["shape"])
    return torch.from_numpy(x.copy()), torch.from_numpy(np.frombuffer(bytes.fromhex(REFERENCE["importance"]),
                                                                       np.float32).copy())


@pytest.mark.parametrize("case", ["Q8_0", "Q4_0", "Q4_0-imatrix"])
def test_blocks_equal_llama_cpp_c_code_byte_for_byte(case):
    x, importance = reference_input()
    kind = case.split("-")[0]
    ours = ggml.quantize(x, kind, importance if case.endswith("imatrix") else None)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (x.shape[0], ggml.row_bytes(kind, x.shape[1]))
    assert ours.numpy().tobytes().hex() == REFERENCE["expected"][case]


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_reference_rounding_equals_the_gguf_package_and_decodes_as_it_does(kind):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 320)) * 0.05).astype(np.float32)
    x[2, :64] = np.round(x[2, :64] * 32) / 32  # exact halves after scaling: roundf, not round-half-even
    qtype = gguf.GGMLQuantizationType[kind]
    ours = ggml.quantize(torch.from_numpy(x), kind)
    assert np.array_equal(ours.numpy(), gguf.quants.quantize(x, qtype))
    assert np.array_equal(ggml.dequantize(ours, kind, 320).numpy(), gguf.quants.dequantize(ours.numpy(), qtype))


def test_importance_weighting_lowers_the_weighted_error_it_is_asked_to_lower():
    x, _ = reference_input()
    importance = torch.zeros(x.shape[1])
    importance[::4] = 1.0  # only every fourth input matters
    error = {}
    for name, weights in (("reference", None), ("weighted", importance)):
        decoded = ggml.dequantize(ggml.quantize(x, "Q4_0", weights), "Q4_0", x.shape[1])
        error[name] = float((importance * (decoded - x) ** 2).sum())
    assert error["weighted"] < 0.8 * error["reference"]


def test_a_block_of_zeros_stores_a_zero_scale_and_decodes_to_zeros():
    x = torch.zeros(2, 64)
    x[1] = torch.linspace(-1, 1, 64)
    for kind, importance in (("Q4_0", None), ("Q4_0", torch.ones(64)), ("Q8_0", None)):
        blocks = ggml.quantize(x, kind, importance)
        assert blocks[0, 0] == 0 and blocks[0, 1] & 0x7F == 0  # F16 scale ±0 (the reference Q4_0 writes -0, as C does)
        assert not ggml.dequantize(blocks, kind, 64)[0].any()
