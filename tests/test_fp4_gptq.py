"""GPTQ and the group-scale searches on NVFP4 weights (builder/quant/gptq.py, observe.fp4_scales): each column is
rounded to E2M1 with its group's FP8 scale under the global scale exactly as the writer rounds (builder/quant/fp4.py),
the global scale is shared by the Linears vLLM fuses, and on a tiny model GPTQ leaves less error in the Linears'
outputs on the calibration text than round to nearest does."""

import pytest
import torch

import conftest
from builder import build
from builder.quant import fp4, gptq, observe
from builder.quant.step import Layer, shared_sums
from builder.release.recipe import Recipe
from builder.spill import Spill
from conftest import Repo
from test_fp4 import LINEARS, MODEL, shipped, tensors, unpacked

GPTQ_SETTINGS = {"block_size": 32, "dampening_frac": 0.01, "actorder": "static"}
CALIBRATION = ("calibration=licenses", "calibration.samples=4", "calibration.sequence_length=64")


def nvfp4a16_gptq(observer: str = "minmax") -> Recipe:
    data = shipped("nvfp4a16", algorithm="gptq", gptq=GPTQ_SETTINGS)
    if observer != "minmax":
        data["weights"] = {**data["weights"], "observer": observer}
    return Recipe.of(data)


def correlated_inputs(columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(512, columns, generator=generator) @ torch.randn(columns, columns, generator=generator) * 0.2


def test_without_correlated_inputs_gptq_writes_the_codes_and_scales_of_round_to_nearest():
    """A diagonal Hessian leaves no error to compensate: every value is rounded as the writer's round to nearest
    rounds it (the same E2M1 codes, a tiny negative value's negative zero included), under the same FP8 and global
    scales. (A weight that is exactly -0.0 may come out +0: the compensation adds zeros of either sign, as
    llm-compressor's GPTQ does; both decode to 0.)"""
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    weight[0, :3] = torch.tensor([-1e-6, 1e-6, 0.0])
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(2)) + 0.5)
    codes, scale, global_scale = gptq.quantize(weight, hessian, nvfp4a16_gptq())
    expected_global = fp4.global_scale(weight.abs().amax())
    expected_scale = fp4.group_scales(weight, expected_global, 16)
    assert torch.equal(global_scale, expected_global)
    assert torch.equal(scale.view(torch.uint8), expected_scale.view(torch.uint8))
    assert torch.equal(codes, fp4.quantize_weight(weight, expected_scale, expected_global, 16))


def test_gptq_lowers_the_output_error_on_its_inputs_and_keeps_every_value_on_the_written_grid():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    x = correlated_inputs(128)
    codes, scale, global_scale = gptq.quantize(weight, x.T @ x, nvfp4a16_gptq())
    rtn_scale = fp4.group_scales(weight, global_scale, 16)
    rtn = fp4.dequantize(fp4.quantize_weight(weight, rtn_scale, global_scale, 16), rtn_scale, global_scale, 16)
    ours = fp4.dequantize(codes, scale, global_scale, 16)
    assert float(((x @ (ours - weight).T) ** 2).sum()) < 0.9 * float(((x @ (rtn - weight).T) ** 2).sum())
    assert torch.equal(fp4.quantize_weight(ours, scale, global_scale, 16), codes)  # the codes of its own values


@pytest.mark.parametrize("observer", ["mse", "imatrix_mse"])
def test_searched_group_scales_never_round_a_group_with_more_error_than_max_w_scales(observer):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    weight[:, 5] *= 8  # outliers: clipping them pays for the rest of their group
    importance = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.1
    args = nvfp4a16_gptq(observer).weights
    global_scale = fp4.global_scale(weight.abs().amax())
    minmax = fp4.group_scales(weight, global_scale, 16)
    searched = observe.fp4_scales(weight, args, global_scale, importance)
    cells = weight.reshape(32, 4, 16)
    columns = observe.column_weights(importance).reshape(1, 4, 16) if observer == "imatrix_mse" else None
    norm = args.search["norm"]
    before, after = (observe.fp4_error(cells, scale, global_scale, norm, columns) for scale in (minmax, searched))
    assert (after <= before).all() and (after < before).any()
    assert (searched.float() <= minmax.float()).all()  # ratios of max |w| at most 1


def test_finish_shares_the_global_scale_of_the_linears_vllm_fuses_and_computes_with_their_decoded_weights():
    torch.manual_seed(0)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    linears = {f"model.layers.0.{name}": torch.nn.Linear(64, 64, bias=False) for name in names}
    linears["model.layers.0.self_attn.k_proj"].weight.data *= 3  # the largest of q/k/v sets their global scale
    module = torch.nn.ModuleDict({name.replace(".", "_"): linear for name, linear in linears.items()})

    def run(replace):
        x = correlated_inputs(64, seed=6)
        for linear in linears.values():
            linear(x)

    layer = Layer(0, "model.layers.0.", module, None, dict(linears), run, print)
    originals = {name: linear.weight.data.clone() for name, linear in linears.items()}
    sums = shared_sums(layer, gptq.add_outer)
    layer.run(False)
    layer.unhook()
    found = gptq.finish(layer, nvfp4a16_gptq(), {"hessian": sums})["gptq"]
    fused = fp4.global_scale(torch.stack([originals[f"model.layers.0.{n}"].abs().amax() for n in names[:3]]).amax())
    for name, (codes, scale, global_scale) in found.items():
        own = fp4.global_scale(originals[name].abs().amax())
        assert torch.equal(global_scale, own if name.endswith("o_proj") else fused), name
        x = correlated_inputs(64, seed=7)[:5]
        decoded = fp4.dequantize(codes, scale, global_scale, 16)
        assert torch.equal(linears[name](x), torch.nn.functional.linear(x, decoded)), name


def test_spilled_nvfp4_results_come_back_with_their_global_scale(tmp_path):
    codes = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    scale, global_scale = torch.rand(8, 2).to(fp4.FP8), torch.tensor([123.5])
    spill = Spill(tmp_path)
    spill.put(0, {"model.layers.0.mlp.up_proj": (codes, scale, global_scale)})
    back = spill.get("model.layers.0.mlp.up_proj")
    assert len(back) == 3 and torch.equal(back[0], codes) and torch.equal(back[2], global_scale)
    assert torch.equal(back[1].view(torch.uint8), scale.view(torch.uint8))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Repo:
    repo = Repo.fresh(tmp_path_factory.mktemp("fp4-gptq") / "repo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(conftest.TINY, "tiny-fp4", MODEL)
        repo.add_model("tiny-fp4", tokenizer=True)
    (repo.root / "specs" / "release" / "tiny-fp4-nvfp4a16.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny-fp4\n  - override /quant: nvfp4a16\n"
        "  - override /target: vllm-b200\n  - override /calibration: none\n\n"
        "release:\n  name: tiny-fp4-nvfp4a16\n  version: 0.0.1\n")
    return repo


def decoded(folder, module: str) -> torch.Tensor:
    saved = {name.removeprefix(module + "."): tensor for name, tensor in tensors(folder / "model.safetensors").items()
             if name.startswith(module + ".")}
    return fp4.dequantize(unpacked(saved["weight_packed"]), saved["weight_scale"], saved["weight_global_scale"], 16)


def test_on_a_tiny_model_gptq_leaves_less_linear_output_error_than_round_to_nearest_on_the_calibration_text(
        tiny_repo, tmp_path):
    """Both builds of one tiny Llama (nvfp4a16 rounded to nearest; the same with algorithm gptq on 4 windows of
    the licence texts), measured on the source model's inputs to every Linear over those same windows."""
    from transformers import AutoModelForCausalLM

    from builder.release.resolve import resolve
    from builder.source import data

    rtn = tmp_path / "rtn"
    build.build(tiny_repo.root, "tiny-fp4-nvfp4a16", out=rtn, log=lambda m: None)
    overrides = ("quant.algorithm=gptq", "quant.gptq={block_size:128,dampening_frac:0.01,actorder:static}",
                 *CALIBRATION)
    manifest = build.build(tiny_repo.root, "tiny-fp4-nvfp4a16", overrides, out=tmp_path / "gptq", log=lambda m: None)
    assert manifest["inputs"]["versions"].keys() >= {"gptq", "calibration", "quantize.nvfp4"}
    spec = resolve(tiny_repo.root, "tiny-fp4-nvfp4a16", overrides)["calibration"]
    weights = tiny_repo.root / "weights" / "tiny-fp4"
    ids = data.samples(tiny_repo.root, spec, weights, file="test", group="calibration")
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    inputs = {}
    for name, linear in model.named_modules():
        if name.split(".", 3)[-1] in LINEARS:
            linear.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    errors = {}
    for name, batches in inputs.items():
        x, weight = torch.cat(batches), model.get_submodule(name).weight.data
        errors[name] = [float(((x @ (decoded(folder, name) - weight).T) ** 2).sum())
                        for folder in (rtn, tmp_path / "gptq")]
    total_rtn, total_gptq = (sum(pair[i] for pair in errors.values()) for i in (0, 1))
    print(f"sum of squared Linear output errors: round to nearest {total_rtn:.4g}, GPTQ {total_gptq:.4g}")
    assert total_gptq < 0.9 * total_rtn
    assert sum(ours < theirs for theirs, ours in errors.values()) >= len(errors) - 2  # nearly every Linear gains
