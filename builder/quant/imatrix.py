"""E[x²] per input column of every targeted Linear, two calibration steps on one mechanism: the
imatrix_mse observer's weights (observe.weight_scale, GPTQ's scales; FP32 sums) and llama.cpp's
importance matrix for Q4_0's weighted rounding (ggml.quantize; FP64 sums, as llama-imatrix keeps).

    found["imatrix"][module], found["importance"][module]   (each [columns], FP32)

The two differ only in the sums' precision, and stay two: one FP64 sum would change the bytes of
every imatrix_mse release, one FP32 sum those of every GGUF imatrix release. Linears reading one
input tensor share its sum (each used to sum the same tensor itself: the same bits). Sums run over
the batches in a fixed order, so every run gives the same bits.
"""

import torch

from builder.quant.step import Step, means, shared_sums


def square_sums(dtype: torch.dtype):
    """observe(layer, recipe) keeping the sum of x² per input column in dtype (step.shared_sums)."""
    def add(total, x):
        squares = x.to(dtype).square().sum(dim=0)
        return squares if total is None else total.add_(squares)

    return lambda layer, recipe: shared_sums(layer, add)


MEAN_SQUARES = Step("mean_squares", ("imatrix",), {"weights.observer": "imatrix_mse"},
                    observe=square_sums(torch.float32),
                    finish=lambda layer, recipe, seen: {"imatrix": means(seen["mean_squares"])})
IMPORTANCE = Step("importance", ("importance",), {"algorithm": "imatrix"},
                  observe=square_sums(torch.float64),
                  finish=lambda layer, recipe, seen: {"importance": means(seen["importance"])})
