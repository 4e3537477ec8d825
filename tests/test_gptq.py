"""GPTQ in bounded memory: the Hessian is factorised in its own memory, Linears that read one input
share one factor, and every shortcut gives the bits the plain formulas give on fresh copies."""

import pytest
import torch

from builder.quant import gptq
from builder.quant.step import Layer, shared_sums
from builder.release.recipe import Recipe

BASE = {"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "gptq", "targets": ["Linear"],
        "ignore": [], "input_activations": None, "kv_cache_scheme": None}
GROUP = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True, "dynamic": False, "group_size": 16}
CHANNEL_FP8 = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
               "group_size": None}
TENSOR_FP8 = {**CHANNEL_FP8, "strategy": "tensor"}  # one scale per Linear, whatever it shares


def recipe_of(weights=GROUP, actorder="static", block=8):
    return Recipe.of({**BASE, "weights": weights,
                      "gptq": {"block_size": block, "dampening_frac": 0.01, "actorder": actorder}})


def lopsided_hessian(columns=96, dead=(3, 40)):
    """x xᵀ of correlated inputs, some never seen, plus noise above the diagonal only: a Hessian whose
    triangles differ in the last bits, as a GEMM may leave them (only the lower one may count)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
    x[:, list(dead)] = 0
    return x.T @ x + torch.triu(torch.randn(columns, columns, generator=generator), 1) * 1e-3


def plain_factor(hessian, dampening, actorder):
    """The formulas on fresh tensors: permute by decreasing diagonal, dampen, then the upper Cholesky
    factor of the inverse as J L⁻¹ J, L the Cholesky factor of the reversed Hessian (J H J)."""
    order = gptq.column_order(hessian, actorder)
    h = hessian[order][:, order].clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += torch.eye(h.shape[0]) * (dampening * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(torch.tril(h).flip(0, 1) + torch.tril(h, -1).T.flip(0, 1))
    gptq.invert_lower_(lower)
    return order, dead, lower.flip(0, 1), h


@pytest.mark.parametrize("actorder", ["static", None])
def test_the_factor_is_computed_in_the_hessians_own_memory_with_the_bits_of_the_plain_formulas(actorder):
    hessian = lopsided_hessian()
    order, dead, upper, dampened = plain_factor(hessian, 0.01, actorder)
    consumed = hessian.clone()
    factor = gptq.factorise(consumed, recipe_of(actorder=actorder).gptq, "m")
    assert factor.inverse.data_ptr() == consumed.data_ptr()  # no second Hessian-sized tensor is kept
    assert torch.equal(factor.order, order) and torch.equal(factor.dead, dead)
    assert torch.equal(factor.inverse, upper)
    # and it is the classic one (Cholesky, its inverse, an upper Cholesky of that) up to FP32 rounding
    symmetric = torch.tril(dampened) + torch.tril(dampened, -1).T
    classic = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(symmetric)), upper=True)
    assert torch.equal(factor.inverse, torch.triu(factor.inverse))
    assert torch.allclose(factor.inverse, classic, rtol=0, atol=1e-5 * classic.abs().max())


@pytest.mark.parametrize("size", [1, 127, 128, 300])
def test_a_lower_triangular_matrix_is_inverted_in_its_own_memory_across_block_boundaries(size):
    generator = torch.Generator().manual_seed(size)
    lower = torch.tril(torch.randn(size, size, generator=generator)) + torch.eye(size) * size ** 0.5
    expected = torch.linalg.inv(lower.double())
    gptq.invert_lower_(inverted := lower.clone())
    assert torch.equal(inverted, torch.tril(inverted))
    assert torch.allclose(inverted.double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_in_place_permutations_move_values_exactly_as_indexing_does():
    square = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    expected, columns = square[order][:, order], square[:, order]
    gptq.permute_(moved := square.clone(), order)
    gptq.permute_columns_(only_columns := square.clone(), order)
    assert torch.equal(moved, expected) and torch.equal(only_columns, columns)


@pytest.mark.parametrize("size", [299, 300, 600])
def test_half_turns_move_values_exactly_as_flipping_does_whatever_the_block_boundaries(size):
    square = torch.randn(size, size, generator=torch.Generator().manual_seed(4))
    gptq.turned_lower_onto_upper_(upper := square.clone())
    turned = square.flip(0, 1)
    assert torch.equal(torch.triu(upper), torch.triu(turned))  # the lower triangle, turned half a turn
    assert torch.equal(torch.tril(upper, -1), torch.tril(square, -1))  # and left where it was
    gptq.turn_(whole := square.clone())
    assert torch.equal(whole, turned)


@pytest.mark.parametrize("weights", [GROUP, {**GROUP, "num_bits": 8, "strategy": "channel", "group_size": None},
                                     {**GROUP, "num_bits": 8, "type": "float", "strategy": "tensor",
                                      "group_size": None}])
def test_dequantize_scales_each_value_once_as_a_full_scale_matrix_would(weights):
    recipe = recipe_of(weights)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    values, scale = gptq.quantize(weight, lopsided_hessian(64, dead=()), recipe)
    full = gptq.expand(scale.float().reshape(-1, 1) if scale.dim() < 2 else scale.float(), recipe.weights, 64)
    assert torch.equal(gptq.dequantize(values, scale, recipe.weights), values.float() * full)


@pytest.mark.parametrize("weights", [GROUP, CHANNEL_FP8, TENSOR_FP8], ids=["int4-group", "fp8-channel", "fp8-tensor"])
def test_linears_reading_one_input_share_one_factor_and_each_gets_what_it_would_get_alone(weights):
    """q and k read the same input (one Hessian entry), o its own: finish rounds each as quantize
    would on copies, frees every Hessian, and the layer then computes with the rounded weights
    (made from the integers as each Linear runs: the Linear keeps no FP32 weight of its own)."""
    torch.manual_seed(0)
    linears = {"q": torch.nn.Linear(64, 32, bias=False), "k": torch.nn.Linear(64, 16, bias=False),
               "o": torch.nn.Linear(32, 64, bias=False)}
    module = torch.nn.ModuleDict(linears)

    def run(replace):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
        linears["q"](x), linears["k"](x), linears["o"](torch.randn(5, 32))

    layer = Layer(0, "model.layers.0.", module, None, dict(linears), run, print)
    recipe = recipe_of(weights)
    sums = shared_sums(layer, gptq.add_outer)
    layer.run(False)
    layer.unhook()
    assert sums["q"] is sums["k"] and sums["o"] is not sums["q"]
    originals = {name: linear.weight.data.clone() for name, linear in linears.items()}
    hessians = {name: entry[0].clone() for name, entry in sums.items()}
    expected = {name: gptq.quantize(originals[name], hessians[name], recipe, name) for name in linears}
    found = gptq.finish(layer, recipe, {"hessian": sums})["gptq"]
    for name, (values, scale) in expected.items():
        assert torch.equal(found[name][0], values) and torch.equal(found[name][1], scale)
        x = torch.randn(3, linears[name].in_features)
        rounded = gptq.dequantize(values, scale, recipe.weights)
        assert torch.equal(linears[name](x), torch.nn.functional.linear(x, rounded))
        assert linears[name].weight.numel() == 0
    assert all(entry[0] is None for entry in sums.values())  # the Hessians' memory went with their factors


def test_batches_kept_while_fewer_than_their_features_sum_to_the_bits_of_the_running_sum():
    """gather keeps the inputs (less memory than x xᵀ while tokens <= features), switches to the sum
    once they would not be, and summed gives the very Hessian add_outer accumulates batch by batch."""
    batches = [torch.randn(tokens, 48, generator=torch.Generator().manual_seed(tokens)) for tokens in (20, 20, 30, 7)]
    running, kept, states = None, None, []
    for x in batches:
        running, kept = gptq.add_outer(running, x), gptq.gather(kept, x)
        states.append(isinstance(kept, gptq.Inputs))
        assert torch.equal(gptq.summed(kept), running)
    assert states == [True, True, False, False]  # 20, 40 tokens kept; 70 > 48 features: summed from then on
