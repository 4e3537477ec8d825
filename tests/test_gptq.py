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
    """The formulas on fresh tensors: permute by decreasing diagonal, dampen, then R = J L J (H = R Rᵀ), L
    the Cholesky factor of the reversed Hessian (J H J)."""
    order = gptq.column_order(hessian, actorder)
    h = hessian[order][:, order].clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += torch.eye(h.shape[0]) * (dampening * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(torch.tril(h).flip(0, 1) + torch.tril(h, -1).T.flip(0, 1))
    return order, dead, lower.flip(0, 1), h


@pytest.mark.parametrize("actorder", ["static", None])
def test_the_factor_is_computed_in_the_hessians_own_memory_with_the_bits_of_the_plain_formulas(actorder):
    hessian = lopsided_hessian()
    order, dead, upper, dampened = plain_factor(hessian, 0.01, actorder)
    consumed = hessian.clone()
    factor = gptq.factorise(consumed, recipe_of(actorder=actorder).gptq, "m")
    assert factor.root.data_ptr() == consumed.data_ptr()  # no second Hessian-sized tensor is kept
    assert torch.equal(factor.order, order) and torch.equal(factor.dead, dead)
    assert torch.equal(factor.root, upper)
    # and it is an upper triangular R with R Rᵀ the dampened Hessian (its lower triangle) up to FP32 rounding
    symmetric = torch.tril(dampened) + torch.tril(dampened, -1).T
    assert torch.equal(factor.root, torch.triu(factor.root))
    assert torch.allclose(factor.root @ factor.root.T, symmetric, rtol=0, atol=1e-5 * symmetric.abs().max())


def classic_gptq(weight, hessian, step, code_of):
    """GPTQ as published (Frantar et al., Algorithm 1, in FP64, columns in storage order): the upper
    Cholesky factor U of H⁻¹, each column rounded (code_of: values / step -> codes), its error
    (w - q) / U_jj subtracted from the later columns along U's row."""
    weight, upper = weight.double().clone(), torch.linalg.cholesky(torch.linalg.inv(hessian.double()), upper=True)
    codes = []
    for j in range(weight.shape[1]):
        codes.append(code_of(weight[:, j] / step))
        error = (weight[:, j] - codes[-1].double() * step) / upper[j, j]
        weight[:, j:] -= error.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    return torch.stack(codes, dim=1)


INT8 = ({**GROUP, "num_bits": 8, "strategy": "tensor", "group_size": None}, torch.int8,
        lambda scaled: torch.round(scaled).clamp(-128, 127).to(torch.int8))
FP8 = (TENSOR_FP8, torch.float8_e4m3fn, lambda scaled: scaled.clamp(-448, 448).float().to(torch.float8_e4m3fn))


@pytest.mark.parametrize("grid", [INT8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("block", [8, 128])
def test_the_column_loop_on_the_hessians_factor_gives_the_codes_of_gptq_as_published(block, grid):
    """The loop works from R (H = R Rᵀ) instead of the inverse's factor: the same algorithm, rearranged
    (Babai's nearest plane), so on an INT8 per-tensor grid it picks the codes FP64 GPTQ picks (on FP8's,
    all but a near-tie or two), and its error on the inputs is GPTQ's."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(400, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    weight = torch.randn(24, 64, generator=generator)
    hessian = x.T @ x + torch.eye(64)
    weights, dtype, code_of = grid
    recipe = recipe_of(weights, actorder=None, block=block)
    scale = torch.tensor(0.05)
    root = gptq.upper_root(hessian.clone(), 0.0, "m")
    codes = torch.empty(weight.shape, dtype=dtype)
    gptq.column_loop(weight.clone(), root, torch.arange(64), lambda index: scale.expand(len(index), 24),
                     recipe.weights, block, codes)
    expected = classic_gptq(weight, hessian, 0.05, code_of)
    differ = int((codes.view(torch.uint8) != expected.view(torch.uint8)).sum())
    # FP32 against FP64: a value within rounding of a midpoint of FP8's coarser grid may go either way
    assert differ == 0 if dtype == torch.int8 else differ <= 2, differ

    def error(c):
        return float(((x.double() @ (c.double() * 0.05 - weight.double()).T) ** 2).sum())
    assert error(expected) < 0.8 * error(code_of(weight / 0.05))  # GPTQ's point: less error than round to nearest


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
