"""The FP4 E2M1 and E8M0 decoders every stage shares (builder/minifloat.py): each code reads back to the
number the OCP microscaling spec gives it, in every dtype the readers ask for."""

import math

import torch

from builder import minifloat


def test_every_e2m1_code_reads_as_the_spec_value_with_its_sign():
    codes = torch.arange(16, dtype=torch.uint8)
    values = minifloat.e2m1(codes)
    magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values.dtype == torch.float32
    assert values.tolist() == magnitudes + [-m for m in magnitudes]
    assert math.copysign(1.0, float(values[8])) == -1.0  # code 8 is -0, as compressed-tensors reads it


def test_every_e8m0_exponent_is_an_exact_power_of_two_in_fp32_and_bf16():
    exponents = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = [math.ldexp(1.0, e - 127) for e in range(255)] + [math.inf]  # 255: E8M0's NaN code
    for dtype in (torch.float32, torch.bfloat16):
        powers = minifloat.e8m0(exponents, dtype)
        assert powers.dtype == dtype
        assert powers.float().tolist() == expected
