"""GGUF and MLX releases go through the pipeline and the checks like any other: `dvc repro` builds them
from their locks (a second repro builds nothing), `builder sign` / `verify --key` cover their files, and
`builder plan` names the one release a change of its recipe touches."""

import subprocess
import sys

from builder.release import lock
from conftest import init_pipeline, release_text
from test_signing import write_keys

RELEASES = {"tiny-llama-gguf-q8_0": ("gguf-q8_0", "llama-cpp"), "tiny-llama-mlx-4bit": ("mlx-4bit", "mlx")}


def test_dvc_repro_sign_verify_and_plan_treat_gguf_and_mlx_releases_like_any_other(tmp_path):
    pipeline = init_pipeline(tmp_path / "repo", ("tiny-llama",), (), tokenizer="bpe")
    root = pipeline.root
    for name, (quant, target) in RELEASES.items():
        (root / "specs" / "release" / f"{name}.yaml").write_text(release_text(name, "tiny-llama", quant, target))
    lock.write(root)
    pipeline.dvc("add", "-q", "weights/tiny-llama")
    pipeline.commit("on-device releases")
    assert pipeline.repro() == {f"build@{name}" for name in RELEASES}
    pipeline.commit("built")
    assert pipeline.repro() == set()
    assert (root / "artifacts" / "tiny-llama-gguf-q8_0" / "tiny-llama-gguf-q8_0.gguf").is_file()

    private, public = write_keys(tmp_path)
    for name in RELEASES:
        artifact = str(root / "artifacts" / name)
        for args in (("sign", artifact, "--key", str(private)), ("verify", "--key", str(public), artifact),
                     ("audit", artifact, "--key", str(public))):
            result = subprocess.run([sys.executable, "-m", "builder", *args], cwd=root, capture_output=True,
                                    text=True, env=pipeline.environment())
            assert result.returncode == 0, (args, result.stderr)

    recipe = root / "specs" / "quant" / "mlx-4bit.yaml"
    recipe.write_text(recipe.read_text().replace("group_size: 64 ", "group_size: 32 "))
    result = subprocess.run([sys.executable, "-m", "builder", "plan", "--base", "HEAD"], cwd=root, capture_output=True,
                            text=True, env=pipeline.environment())
    assert result.returncode == 0, result.stderr
    assert "0 added, 0 removed, 1 changed, 1 unchanged." in result.stdout
    assert "### Changed: `tiny-llama-mlx-4bit`" in result.stdout
    assert "| `quant.weights.group_size` | `64` | `32` |" in result.stdout
