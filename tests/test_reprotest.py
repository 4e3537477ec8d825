"""bench/reprotest: a release rebuilt under varied environments gives the same bytes (tiny model, subset)."""

import importlib.machinery
import importlib.util

from conftest import PROJECT


def load_reprotest():
    loader = importlib.machinery.SourceFileLoader("reprotest", str(PROJECT / "bench" / "reprotest"))
    spec = importlib.util.spec_from_loader("reprotest", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_varied_environments_give_byte_identical_artifacts(repo):
    reprotest = load_reprotest()
    repo.add_model("tiny-qwen2")
    # "all at once" applies every variation together (cwd, TZ, locale, umask, HOME, PATH, extra
    # variables, one CPU and OMP/MKL of 1); bench/reprotest runs them one by one on the real model.
    rows = reprotest.reprotest(repo.root, "tiny-qwen2-fp8-dynamic", ["baseline", "all at once"], log=lambda m: None)
    assert [name for name, _, _ in rows] == ["baseline", "all at once"]
    assert all(same for _, _, same in rows), rows
    assert len({digest for _, digest, _ in rows}) == 1
    assert "| all at once | `sha256:" in reprotest.table("tiny-qwen2-fp8-dynamic", rows)


def test_every_variation_is_applied_in_the_all_at_once_run():
    reprotest = load_reprotest()
    combined = reprotest.VARIATIONS["all at once"]
    for name, variation in reprotest.VARIATIONS.items():
        for key, value in variation.items():
            expected = value if key != "env" else {**combined["env"], **value}
            assert combined[key] == expected, (name, key)
