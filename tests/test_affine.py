"""MLX's affine quantization: the same codes, scales and biases as mx.quantize (tests/reference/mlx_affine.json,
from mlx 0.32.4 through bench/reference_vectors.py), and packing that round-trips."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.quant import affine

REFERENCE = json.loads((Path(__file__).parent / "reference" / "mlx_affine.json").read_text())
CASES = REFERENCE["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['dtype']}-{c['bits']}bit-g{c['group_size']}" for c in CASES])
def test_quantize_equals_mlx_bit_for_bit(case):
    x = torch.from_numpy(np.frombuffer(bytes.fromhex(REFERENCE["input"]), np.float32).reshape(REFERENCE["shape"]).copy())
    dtype = getattr(torch, case["dtype"])
    packed, scales, biases = affine.quantize(x.to(dtype), case["bits"], case["group_size"], dtype)
    assert packed.dtype == torch.uint32 and scales.dtype == dtype and biases.dtype == dtype
    assert packed.view(torch.int32).numpy().tobytes().hex() == case["packed"]
    assert scales.to(torch.float32).numpy().tobytes().hex() == case["scales"]
    assert biases.to(torch.float32).numpy().tobytes().hex() == case["biases"]


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weights_are_within_a_step_and_zero_is_exact(bits):
    torch.manual_seed(0)
    x = torch.randn(6, 128) * 0.1
    x[0, :64] = 0.0
    packed, scales, biases = affine.quantize(x, bits, 64, torch.float32)
    decoded = affine.dequantize(packed, scales, biases, bits)
    step = scales.abs().repeat_interleave(64, dim=1)
    assert bool(((decoded - x).abs() <= step).all())  # the scale is nudged so that 0 is a code
    assert torch.equal(decoded[0, :64], x[0, :64])
    assert torch.equal(affine.unpack(packed, bits), torch.round((x.reshape(6, 2, 64) - biases[..., None])
                                                                / scales[..., None]).clamp(0, 2 ** bits - 1)
                       .reshape(6, 128).to(torch.int64))
