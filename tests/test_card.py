"""README.md: a Hugging Face model card for every release, with recipe, target, eval, serve and rebuild."""

import pytest
import yaml

from builder.release import lock
from builder.artifact.card import model_card
from builder.release.recipe import Recipe
from builder.release.resolve import list_releases
from builder.artifact.serve import serve_config
from conftest import PROJECT


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("release", list_releases(PROJECT))
def test_card_has_hub_front_matter_and_says_how_to_serve_and_rebuild(release):
    release_ = lock.committed(PROJECT, release)
    spec, text = release_.spec.data(), model_card(release_)
    matter = front_matter(text)
    assert matter["base_model"] == spec["model"]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert matter["base_model_relation"] == "quantized"
    library = {"gguf": "gguf", "mlx": "mlx"}.get(spec["quant"]["format"], "transformers")
    assert matter["license"] == spec["model"]["license"] and matter["library_name"] == library
    assert {Recipe.of(spec["quant"]).scheme_class, spec["choices"]["target"], spec["target"]["runtime"]} \
        <= set(matter["tags"])
    assert serve_config(release_)["command"] in text
    assert release_.artifact_id in text and f"builder build {release}\n" in text
    assert f"dvc repro build@{release}" in text
    layout = f"{spec['parallelism']['tensor']} / {spec['parallelism']['pipeline']}"
    assert f"| tensor / pipeline parallel | {layout} |" in text
    assert "Not measured at build time" in text


def test_card_shows_the_eval_table_when_the_build_measured_quality():
    release = lock.committed(PROJECT, "smollm2-135m-instruct-fp8-dynamic")
    text = model_card(release, {"perplexity": {"source": 12.5, "artifact": 12.625}, "mean_kl": 0.004,
                                "passed": True, "dataset": "data/eval.txt"})
    assert "| metric | value |\n|---|---|\n| mean_kl | 0.004 |\n| perplexity.artifact | 12.625 |\n" \
           "| perplexity.source | 12.5 |\n" in text
    assert "Not measured" not in text


def test_card_of_the_fp8_release_describes_its_recipe():
    text = model_card(lock.committed(PROJECT, "smollm2-135m-instruct-fp8-dynamic"))
    assert "| weights | fp8, channel, symmetric, static scales |" in text
    assert "| input activations | fp8, token, symmetric, dynamic scales |" in text
    assert "| kept unquantized | lm_head |" in text
    assert "compressed-tensors" in front_matter(text)["tags"]


@pytest.mark.parametrize("release", ["smollm2-135m-instruct-gguf-q8_0", "smollm2-135m-instruct-mlx-4bit"])
def test_card_of_an_on_device_release_says_how_to_serve_and_run_it(release):
    locked = lock.committed(PROJECT, release)
    text, serve = model_card(locked), serve_config(locked)
    assert serve["command"].startswith(("llama-server -m artifacts/", "mlx_lm.server --model artifacts/"))
    assert serve["command"] in text and f"One greedy completion:\n\n```bash\n{serve['try']}\n```" in text
    assert "gguf" in front_matter(text)["tags"] or "mlx" in front_matter(text)["tags"]
