"""llama.cpp's K-quants Q4_K / Q5_K / Q6_K and the Q5_0 / Q5_1 blocks its K_M presets fall back to, with and
without an imatrix: the same bytes as llama.cpp's C code (tests/reference/kquant_blocks.json, from
bench/kquant_vectors.py), decoded by the gguf package to the values llama.cpp's dequantizer gives; and
llama-quantize's Q4_K_M / Q5_K_M type mix."""

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from builder.formats import kmix
from builder.quant import kquants, q5blocks

REFERENCE = json.loads((Path(__file__).parent / "reference" / "kquant_blocks.json").read_text())
CASES = [(name, case) for name, entry in sorted(REFERENCE["inputs"].items()) for case in sorted(entry["expected"])]


def stored(name: str) -> tuple:
    """The input [rows, columns] and importance [columns] of one stored input, as torch FP32."""
    entry = REFERENCE["inputs"][name]
    x = np.frombuffer(bytes.fromhex(entry["input"]), np.float32).reshape(entry["shape"])
    importance = np.frombuffer(bytes.fromhex(entry["importance"]), np.float32)
    return torch.from_numpy(x.copy()), torch.from_numpy(importance.copy())


@pytest.mark.parametrize("name, case", CASES)
def test_blocks_equal_llama_cpp_c_code_byte_for_byte(name, case):
    x, importance = stored(name)
    kind = case.split("-")[0]
    ours = kquants.quantize(x, kind, importance if case.endswith("imatrix") else None)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (x.shape[0], kquants.row_bytes(kind, x.shape[1]))
    assert ours.numpy().tobytes().hex() == REFERENCE["inputs"][name]["expected"][case]


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1"])
def test_fallback_blocks_decode_as_llama_cpp_and_match_the_gguf_package_reference_quantizer(kind):
    x, _ = stored("hard")
    ours = kquants.quantize(x, kind).numpy()
    qtype = gguf.GGMLQuantizationType[kind]
    with np.errstate(invalid="ignore", over="ignore"):
        decoded = gguf.quants.dequantize(ours, qtype).astype(np.float32)
        theirs = gguf.quants.quantize(x.numpy(), qtype)
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == REFERENCE["inputs"]["hard"]["dequantized"][kind]
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("kind", sorted(kquants.BLOCK_BYTES))
def test_the_gguf_package_decodes_our_blocks_to_llama_cpp_dequantized_values(kind):
    x, _ = stored("hard")
    ours = kquants.quantize(x, kind).numpy()
    with np.errstate(invalid="ignore"):  # the super-block of 1e9s overflows F16 in llama.cpp too: NaNs
        decoded = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType[kind]).astype(np.float32)
    assert decoded.tobytes().hex() == REFERENCE["inputs"]["hard"]["dequantized"][kind]
    values = x.numpy()
    assert np.isnan(decoded[3, 256:]).all() and np.isfinite(np.delete(decoded, 3, axis=0)).all()
    assert not decoded[2].any()  # row 2 (below 1e-6) rounds its F16 scales to zero, in llama.cpp too
    typical = [0, 1, 4, 5, 6, 7]
    error = np.abs(decoded[typical] - values[typical]).max(axis=1)
    assert (error <= np.abs(values[typical]).max(axis=1) / 8).all()


@pytest.mark.parametrize("kind", [*sorted(kquants.BLOCK_BYTES), "Q5_0", "Q5_1"])
def test_importance_weighting_lowers_the_weighted_error_it_is_asked_to_lower(kind):
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((32, 512)).astype(np.float32) * 0.05)
    importance = torch.full((512,), 1e-3)
    importance[::8] = 1.0  # one input in eight matters
    error = {}
    for case, weights in (("reference", None), ("weighted", importance)):
        blocks = kquants.quantize(x, kind, weights).numpy()
        decoded = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).astype(np.float32))
        error[case] = float((importance * (decoded - x) ** 2).sum())
    assert error["weighted"] < 0.9 * error["reference"]


def test_quantize_is_deterministic_whatever_the_input_dtype_and_row_order():
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((6, 256)).astype(np.float32)).to(torch.bfloat16)
    first = kquants.quantize(x, "Q4_K")
    assert torch.equal(first, kquants.quantize(x.to(torch.float32), "Q4_K"))
    assert torch.equal(first.flip(0), kquants.quantize(x.flip(0), "Q4_K"))


def test_bytes_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(8)  # large enough for torch to split its element-wise work across threads
    x = torch.from_numpy(rng.standard_normal((64, 1024)).astype(np.float32))
    importance = torch.from_numpy(rng.gamma(1.0, 1.0, 1024).astype(np.float32))
    threads = torch.get_num_threads()
    try:
        found = []
        for count in (1, 3):
            torch.set_num_threads(count)
            found.append([kquants.quantize(x, kind, importance) for kind in ("Q4_K", "Q6_K", "Q5_1")])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*found))


def test_chunks_that_split_rows_give_the_bytes_of_one_pass(monkeypatch):
    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.standard_normal((12, 768)).astype(np.float32))
    importance = torch.from_numpy(rng.gamma(1.0, 1.0, 768).astype(np.float32))
    whole = {kind: kquants.quantize(x, kind, importance) for kind in ("Q6_K", "Q4_K", "Q5_0")}
    monkeypatch.setattr(kquants, "CHUNK", 5)                # super-blocks: rows have 3, chunks split them
    monkeypatch.setattr(q5blocks, "CHUNK_BLOCKS", 40)       # blocks: one row of 24 a chunk
    for kind, blocks in whole.items():
        assert torch.equal(kquants.quantize(x, kind, importance), blocks)


def test_rows_that_are_not_a_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="576"):
        kquants.quantize(torch.zeros(2, 576), "Q6_K")
    with pytest.raises(ValueError, match="Q4_0"):
        kquants.quantize(torch.zeros(2, 256), "Q4_0")
    with pytest.raises(ValueError, match="100"):
        kquants.quantize(torch.zeros(2, 100), "Q5_1")


def test_every_type_the_presets_choose_but_f16_is_written_with_the_size_llama_cpp_expects():
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((3, 1536)).astype(np.float32))
    chosen = {kmix.tensor_type(preset, f"blk.{layer}.{role}.weight", layer, 30, row, tied=True)
              for preset in kmix.PRESETS for layer in range(30) for role in ("attn_v", "ffn_down", "ffn_up")
              for row in (576, 1536)}
    assert chosen == {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}
    for kind in chosen:
        blocks = kquants.quantize(x, kind)
        qtype = gguf.GGMLQuantizationType[kind]
        assert blocks.shape[1] == kquants.row_bytes(kind, 1536) == gguf.quants.quant_shape_to_byte_shape((1536,), qtype)[0]


# llama-quantize's choices for a dense 30-layer model (SmolLM2-135M: hidden 576, intermediate 1536, tied
# embeddings); layers 0-2, 5, 8, ..., 23 and 26-29 are the "more bits" ones (n/8 = 3, 7n/8 = 26).
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


@pytest.mark.parametrize("preset, base, base_fallback", [("Q4_K_M", "Q4_K", "Q5_0"), ("Q5_K_M", "Q5_K", "Q5_1")])
def test_type_mix_of_a_30_layer_model_follows_llama_quantize(preset, base, base_fallback):
    assert {layer for layer in range(30) if kmix.more_bits(layer, 30)} == MORE_BITS_30
    for layer in range(30):
        extra = layer in MORE_BITS_30

        def kind(role, row, tied=True):
            return kmix.tensor_type(preset, f"blk.{layer}.{role}.weight", layer, 30, row, tied=tied)

        assert kind("attn_v", 1024) == ("Q6_K" if extra else base)
        assert kind("ffn_down", 1536) == ("Q6_K" if extra else base)
        assert kind("attn_q", 1024) == kind("attn_k", 1024) == kind("attn_output", 1024) == base
        assert kind("ffn_gate", 1024) == kind("ffn_up", 1024) == base
        # SmolLM2's rows of 576 values: no K-quant fits, llama.cpp falls back to blocks of 32
        assert kind("attn_v", 576) == ("Q8_0" if extra else base_fallback)
        assert kind("attn_q", 576) == kind("attn_output", 576) == kind("ffn_up", 576) == base_fallback
        assert kind("ffn_down", 1536) == ("Q6_K" if extra else base)
        assert kind("attn_norm", 576) is None and kind("ffn_norm", 576) is None
    assert kmix.tensor_type(preset, "output.weight", None, 30, 1024, tied=False) == "Q6_K"
    assert kmix.tensor_type(preset, "token_embd.weight", None, 30, 1024, tied=False) == base
    assert kmix.tensor_type(preset, "token_embd.weight", None, 30, 1024, tied=True) == "Q6_K"
    assert kmix.tensor_type(preset, "token_embd.weight", None, 30, 576, tied=True) == "Q8_0"
    assert kmix.tensor_type(preset, "token_embd.weight", None, 30, 576, tied=False) == base_fallback
    assert kmix.tensor_type(preset, "output_norm.weight", None, 30, 576, tied=True) is None


def test_type_mix_falls_back_to_f16_when_no_block_fits_and_refuses_unknown_presets():
    assert kmix.tensor_type("Q4_K_M", "blk.0.attn_q.weight", 0, 30, 100, tied=True) == "F16"
    assert kmix.tensor_type("Q4_K_M", "output.weight", None, 30, 100, tied=False) == "F16"
    assert kmix.tensor_type("Q5_K_M", "blk.0.attn_qkv.weight", 0, 30, 1024, tied=True) == "Q6_K"
    with pytest.raises(ValueError, match="Q4_K_M"):
        kmix.tensor_type("Q4_K_S", "output.weight", None, 30, 1024, tied=False)
