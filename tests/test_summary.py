"""builder summary: bytes per dtype and a per-layer table with scale statistics."""

from builder import build as build_module
from builder.check import summary


def test_summary_counts_bytes_per_dtype_and_reports_scale_statistics(tiny_repo, tmp_path):
    build_module.build(tiny_repo.root, "tiny-llama-fp8-dynamic", out=tmp_path / "a", log=lambda message: None)
    result = summary.summarize(tmp_path / "a", details=True)
    dtypes = result["dtypes"]
    assert set(dtypes) == {"BF16", "F8_E4M3", "total"}
    assert dtypes["F8_E4M3"]["tensors"] == 14  # 7 Linear layers x 2 decoder layers
    assert dtypes["total"]["bytes"] == (tmp_path / "a" / "model.safetensors").stat().st_size - \
        8 - int.from_bytes((tmp_path / "a" / "model.safetensors").read_bytes()[:8], "little")
    q_proj = result["layers"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["weight"] == {"dtype": "F8_E4M3", "shape": [64, 64]}
    assert 0 < q_proj["weight_scale"]["min"] <= q_proj["weight_scale"]["mean"] <= q_proj["weight_scale"]["max"]
    table = summary.render(result)
    assert "| F8_E4M3 | 14 |" in table and "| model.layers.0.self_attn.q_proj | weight_scale | BF16 |" in table
