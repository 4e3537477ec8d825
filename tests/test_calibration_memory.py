"""Calibration in bounded memory, measured with torch's own allocation records (the profiler's CPU
memory events): a layer keeps its Linears as stored (BF16) and makes one FP32 weight at a time, with
the values FP32 weights give; GPTQ holds one Hessian and one Linear's FP32 weight at a time; a GPTQ
walk over a tiny BF16 Llama never holds a decoder layer's Linears in FP32."""

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from builder.quant import calibrate, gptq, layerwise
from builder.quant.step import Layer, shared_sums
from builder.release.recipe import Recipe
from builder.source import load, skeleton
from builder.spill import Spill
from builder.tensorfile import reader

RECIPE = Recipe.of({"format": "compressed-tensors", "dtype": "bfloat16", "algorithm": "gptq", "targets": ["Linear"],
                    "ignore": [], "input_activations": None, "kv_cache_scheme": None,
                    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True,
                                "dynamic": False, "group_size": 64},
                    "gptq": {"block_size": 128, "dampening_frac": 0.01, "actorder": "static"}})


def allocations(run) -> list:
    """(time ns, bytes: + allocated / - freed, address, bytes live) of every CPU tensor allocation
    while run() runs and of its frees, in order; live bytes count what was allocated while run() ran
    (torch's own running total also keeps what earlier profiles allocated and freed after them)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events, nodes = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    found, blocks, total = [], {}, 0
    for time, size, address in sorted(events):
        if size > 0:
            blocks[address] = size
        elif address not in blocks:
            continue  # made before run() began
        total += size if size > 0 else -blocks.pop(address)
        found.append((time, size, address, total))
    return found


def peak(events: list) -> int:
    """The most bytes live at once of those allocations."""
    return max(live for *_, live in events)


def live_at_once(events: list, groups: dict) -> tuple:
    """For the blocks whose byte size names a group ({bytes: group}): (the most groups with a block
    live at one time, the groups in the order their blocks were made)."""
    live, most, made = {}, 0, []
    for _, size, address, _ in events:
        if size in groups:
            live[address] = groups[size]
            made.append(groups[size])
        elif -size in groups:
            live.pop(address, None)
        most = max(most, len(set(live.values())))
    return most, made


def llama(path, hidden: int, layers: int):
    """A tiny Llama saved in BF16 (every Linear hidden x hidden wide)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                      head_dim=64, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


IDS = torch.randint(1, 255, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return llama(tmp_path_factory.mktemp("llama") / "model", 256, 1)


def layer_zero(path, stored: bool) -> tuple:
    """(module, hidden, arguments, bytes allocated while materialising): layer 0 of the checkpoint,
    materialised as calibrate does (stored: Linears as stored), and the inputs it gets."""
    config, family, model = skeleton.build(path, attention=lambda family: layerwise.register(family.calibrate_with))
    with reader(load.tensor_index(path)) as read:
        hidden, arguments = layerwise.first_inputs(model, config, read, IDS, torch.device("cpu"))
        module = model.model.layers[0]
        made = allocations(lambda: layerwise.materialize(module, "model.layers.0.", family, read, stored=stored))
    return module, hidden, arguments, peak(made)


def test_a_stored_layer_computes_the_values_of_fp32_weights_making_one_fp32_weight_at_a_time(small_llama):
    """Linears keep the checkpoint's BF16, norms are FP32; running the layer gives bit for bit the
    outputs the FP32 layer gives, and needs at most one Linear's FP32 weight more than it at any time."""
    runs, peaks = {}, {}
    for stored in (True, False):
        module, hidden, arguments, made = layer_zero(small_llama, stored)
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        norms = [p for name, p in module.named_parameters() if "norm" in name]
        assert {m.weight.dtype for m in linears} == ({torch.bfloat16} if stored else {torch.float32})
        assert {p.dtype for p in norms} == {torch.float32}
        if stored:  # no FP32 copy of the layer is made: the Linears as read, FP32 norms (and their reads)
            assert made <= sum(m.weight.numel() * 2 for m in linears) + sum(p.numel() * 6 for p in norms)
        peaks[stored] = peak(allocations(lambda: layerwise.run(module, 0, hidden, arguments, replace=True)))
        runs[stored] = hidden
        largest = max(m.weight.numel() * 4 for m in linears)
        layerwise.release(module)
        assert all("forward" not in vars(part) for part in module.modules())
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
    assert peaks[True] <= peaks[False] + largest


def test_gptq_holds_one_hessian_and_one_fp32_weight_at_a_time_widest_hessian_last():
    """Three Linears with inputs of their own (three Hessians, BF16 weights): each Hessian is made when
    its Linear is rounded and freed before the next is made, narrowest first; no two Linears' FP32
    weights are ever live together (each is rounded in its own memory and the layer then computes
    from the integers); the Linears then compute with their rounded weights."""
    widths = (640, 384, 512)
    linears = {f"m{width}": torch.nn.Linear(width, 36, bias=False).to(torch.bfloat16) for width in widths}
    for linear in linears.values():
        layerwise.compute_with(linear, lambda linear=linear: linear.weight.to(torch.float32))
    inputs = {name: [torch.randn(24, linear.in_features, generator=torch.Generator().manual_seed(i))
                     for i in range(3)] for name, linear in linears.items()}

    def run(replace):
        for name, linear in linears.items():
            for x in inputs[name]:
                linear(x)

    layer = Layer(0, "model.layers.0.", torch.nn.ModuleDict(linears), None, dict(linears), run, print)
    sums = shared_sums(layer, gptq.gather)
    layer.run(False)
    layer.unhook()
    originals = {name: linear.weight.data.float() for name, linear in linears.items()}
    found = {}
    events = allocations(lambda: found.update(gptq.finish(layer, RECIPE, {"hessian": sums})["gptq"]))
    # sizes no other tensor of finish has (36 rows: no factorisation scratch is that size)
    hessians, made = live_at_once(events, {width * width * 4: width for width in widths})
    assert hessians == 1 and made == sorted(widths)
    weights, _ = live_at_once(events, {36 * width * 4: width for width in widths})  # and its work buffers
    assert weights == 1
    for name, linear in linears.items():
        hessian = None
        for x in inputs[name]:
            hessian = gptq.add_outer(hessian, x)
        expected = gptq.quantize(originals[name], hessian, RECIPE, name)
        x = torch.randn(5, linear.in_features)
        assert torch.equal(found[name][0], expected[0])
        assert torch.equal(linear(x), torch.nn.functional.linear(x, gptq.dequantize(*found[name], RECIPE.weights)))


def test_a_gptq_walk_never_holds_a_decoder_layers_linears_in_fp32(tmp_path):
    """Two 1024-wide layers, spilled as the build spills: every tensor the walk allocates, at its
    highest, takes less than one layer's Linears in FP32 (the walk before held them, then its
    Hessian, and kept a layer's integers through the next layer)."""
    path = llama(tmp_path / "model", 1024, 2)
    modules = load.architecture(path)["modules"]
    events = allocations(lambda: calibrate.calibrate(path, load.tensor_index(path), modules, RECIPE, IDS,
                                                     log=lambda message: None, spill=Spill(tmp_path / "spill")))
    layer_fp32 = 7 * 1024 * 1024 * 4
    assert layer_fp32 / 2 < peak(events) < layer_fp32
