"""The documents people read stay true: every table that restates code is rendered from it here, and
README.md and docs/*.md must hold exactly that rendering between its markers.

    python tests/test_docs.py          # rewrite the generated tables in place after changing the code
    python -m pytest tests/test_docs.py

A generated table sits between `<!-- generated: NAME -->` and `<!-- end generated -->`; NAME is a key of
TABLES. Each renderer reads what the code or the shipped specs hold, nothing else.
"""

import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run as a script from anywhere: this checkout's builder

DOCS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: ([a-z-]+) -->\n)(.*?)(<!-- end generated -->)", flags=re.S)
README_LINES = 200
# Guides written on another branch at the same time as these (issue 22): linked before they land.
PARALLEL = {"clusters.md"}
# Documents other people write: their paths and commands are theirs to keep true.
OTHERS = {"architecture.md", "provenance.md", "clusters.md"}
OURS = [doc for doc in [*DOCS, PROJECT / "BENCHMARKS.md"] if doc.name not in OTHERS]


def markdown(header: tuple, rows: list) -> str:
    """A Markdown table; cells are strings (pipes escaped)."""
    cell = lambda value: str(value).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]) + "\n"


def specs(group: str) -> dict:
    """Shipped options of a spec group: name -> its YAML."""
    files = sorted((PROJECT / "specs" / group).glob("*.yaml"), key=lambda p: p.stem)
    return {p.stem: yaml.safe_load(p.read_text()) for p in files}


def verbs_table() -> str:
    """The command table: each verb's usage as argparse prints it, and its one-line help (builder/cli.py)."""
    from builder.cli import VERBS, parser

    sub = parser().verbs
    sub["model"] = sub["model"]._subparsers._group_actions[0].choices["add"]  # the one sub-verb: model add
    usage = {verb: " ".join(sub[verb].format_usage().split()).removeprefix("usage: ").replace(" [-h]", "")
             for verb in VERBS}
    return markdown(("command", "what it does"), [(f"`{usage[verb]}`", text) for verb, (_, text) in VERBS.items()])


def parts_table() -> str:
    """The parts that decide output bytes, their versions and packages (builder/release/identity.py)."""
    from builder.release import identity

    from builder import formats

    source = Path(identity.__file__).read_text()
    said = dict(re.findall(r'^\s+"([\w.-]+)": \d+,\s+# (.*)$', source, flags=re.M))
    for name, module in formats.FORMATS.items():  # a format says what it is in its docstring's first sentence
        sentence = " ".join(module.__doc__.split()).split(". ")[0].split(": ", 1)[-1]
        said[f"format.{name}"] = sentence.rstrip(".")
    return markdown(("part", "version", "what it decides", "packages in the id"),
                    [(f"`{part}`", version, said.get(part, ""), ", ".join(identity.PART_PACKAGES.get(part, ())))
                     for part, version in identity.OUTPUT_VERSIONS.items()])


def args_words(args, scales: bool = True) -> str:
    """compressed-tensors' QuantizationArgs in a few words: int4 group 128; fp8 token, dynamic."""
    if args is None:
        return "—"
    strategy = f"group {args.group_size}" if args.strategy == "group" else args.strategy
    words = f"{'fp' if args.type == 'float' else 'int'}{args.num_bits} {strategy}"
    return f"{words}, {'dynamic' if args.dynamic else 'static'}" if scales else words


def recipes_table() -> str:
    """Every shipped recipe (specs/quant/*.yaml) as the builder reads it (Recipe)."""
    from builder.release.recipe import Recipe

    rows = []
    for name, quant in specs("quant").items():
        recipe = Recipe.of(quant)
        weights = args_words(recipe.weights, scales=False) if recipe.weights else recipe.dtype
        extras = [f"SmoothQuant α {recipe.smoothing}" if recipe.smoothing is not None else "",
                  f"AWQ grid {recipe.awq}" if recipe.awq is not None else "",
                  f"{recipe.ggml_mix} mix" if recipe.ggml_mix is not None else "",
                  recipe.weights.observer if recipe.weights and recipe.weights.observer != "minmax" else ""]
        rows.append((f"`{name}`", recipe.format, recipe.scheme_class, weights, args_words(recipe.input_activations),
                     args_words(recipe.kv_cache_scheme), ", ".join(filter(None, [recipe.algorithm or "—", *extras])),
                     "yes" if recipe.needs_calibration else "no"))
    return markdown(("recipe", "format", "kernel family", "weights", "activations", "KV cache",
                     "algorithm", "calibrates"), rows)


def formats_table() -> str:
    """Output formats: which shipped recipes write each, which targets load it, the part that writes it.
    (One function, so the table follows the format code wherever it lives.)"""
    from builder.release.fit import SAFETENSORS_FORMATS
    from builder.release.identity import OUTPUT_VERSIONS

    recipes, targets = specs("quant"), specs("target")
    names = sorted({part.split(".", 1)[1] for part in OUTPUT_VERSIONS if part.startswith("format.")})
    rows = [(f"`{name}`", ", ".join(f"`{r}`" for r, q in recipes.items() if q["format"] == name) or "—",
             ", ".join(t for t, spec in targets.items() if name in spec.get("formats", SAFETENSORS_FORMATS)),
             f"`format.{name}`") for name in names]
    return markdown(("format", "shipped recipes", "targets that load it", "part"), rows)


def targets_table() -> str:
    """Every shipped target (specs/target/*.yaml)."""
    from builder.release.fit import SAFETENSORS_FORMATS

    rows = []
    for name, target in specs("target").items():
        device = target["device"]
        kind = ", ".join(filter(None, [device.get("name"), device["kind"], device.get("compute_capability")
                                       and f"CC {device['compute_capability']}"]))
        rows.append((f"`{name}`", f"{target['runtime']} `{target['runtime_versions']}`",
                     f"{kind}: {device['memory_bytes'] / 2 ** 30:g} GiB × {device['count']}", ", ".join(target["schemes"]),
                     ", ".join(target["activation_scales"]) or "none", ", ".join(target["kv_cache_dtypes"]),
                     ", ".join(target.get("formats", SAFETENSORS_FORMATS))))
    return markdown(("target", "runtime", "device, memory × per node", "kernel families", "activation scales",
                     "KV cache", "formats"), rows)


def families_table() -> str:
    """Supported model families (builder/release/families.py): how each differs from a plain Llama."""
    from builder.release import families

    base = {f.name: f.default for f in fields(families.Family) if f.name not in ("model_type", "classes")}
    rows = []
    for family in families.FAMILIES.values():
        differs = [f"`{key}: {getattr(family, key)}`" for key, value in base.items()
                   if key not in ("moe", "vllm", "planned", "renames", "expert_names") and getattr(family, key) != value]
        if family.moe:
            differs.append(f"experts: `{family.moe.block}.experts.N.{{{','.join(family.moe.experts)}}}`")
        rows.append((f"`{family.model_type}`", ", ".join(f"`{c}`" for c in family.classes),
                     "; ".join(differs) or "(the reference layout)",
                     "yes" if families.smoothable(family) else "no"))
    return markdown(("family", "classes", "differs from Llama in", "SmoothQuant / AWQ"), rows)


def observers_table() -> str:
    """Each weight observer's observer_kwargs and their defaults (builder/release/recipe.py OBSERVERS)."""
    from builder.release.recipe import OBSERVERS

    searched = {name: kwargs for name, kwargs in OBSERVERS.items() if kwargs}
    keys = sorted({key for kwargs in searched.values() for key in kwargs})
    return markdown(("`observer_kwargs` key", *(f"`{name}` default" for name in searched)),
                    [(f"`{key}`", *(kwargs.get(key, "—") for kwargs in searched.values())) for key in keys])


# The shipped recipes each column of the supported-models table stands for.
QUANTS_OF_KIND = {"bf16": ("bf16",), "fp8-dynamic": ("fp8-dynamic", "fp8-block"), "fp8-static": ("fp8-static",),
                  "w8a8-int8": ("w8a8-int8",), "w4a16": ("w4a16", "w4a16-gptq"),
                  "fp4": ("nvfp4a16", "nvfp4", "mxfp4a16", "mxfp4", "mxfp8", "w4afp8", "gpt-oss-mxfp4"),
                  "smoothquant": ("w8a8-int8-smoothquant", "w4a16-awq-gptq-imatrix")}


def supported_models_table() -> str:
    """Family x recipe x runtime (builder/release/families.py, the formats' FAMILIES): which runtime loads
    each family's release of each kind of recipe, and which fact refuses it where none does."""
    from builder import formats
    from builder.release import families, fit, fused

    def cell(family, kind: str) -> str:
        moe = family.moe is not None or family.experts_on_disk
        if kind in ("gguf", "mlx"):
            return {"gguf": "llama.cpp", "mlx": "MLX"}[kind] if family.model_type in formats.of(kind).FAMILIES else "—"
        if kind == "fp8-static" and not families.kv_sources(family):
            return "without KV-cache scales (no `attention` fact)"
        if kind == "smoothquant" and not families.smoothable(family):
            return "refused (no norms absorb the factors)"
        if family.vllm:  # a vLLM runtime has no model for it: what transformers loads of it
            return "— (no vLLM model)" if kind == "w8a8-int8" and moe else "transformers (no vLLM model)"
        vllm = "vLLM" if family.model_type else "vLLM where it has the class"
        return vllm if kind == "w8a8-int8" and moe else f"{vllm}, transformers"

    def fused_cell(cls: str, kind: str) -> str:
        """A family with experts fused on disk: which of the kind's shipped recipes fact_problems lets through."""
        from builder.release.recipe import Recipe

        if kind in ("gguf", "mlx"):
            return "—"
        arch = {"class": cls, "checkpoint": [{"role": "fused", "name": "model.layers.{layer}.experts.down_proj"}]}
        recipes = {quant: Recipe.of(yaml.safe_load((PROJECT / "specs" / "quant" / f"{quant}.yaml").read_text()))
                   for quant in QUANTS_OF_KIND[kind]}
        built = [quant for quant, recipe in recipes.items() if not [
            key for key, _ in fit.scaling_family_problems(arch, recipe) if key != ("quant", "kv_cache_scheme")]]
        if kind == "bf16":
            return "vLLM, transformers"
        if kind == "smoothquant" and not built:
            return "refused (no norms absorb the factors)"
        if not built:
            return "refused (`expert layout`)"
        if all(fused.kept_fused(cls, recipes[quant].format) for quant in built):
            return f"{', '.join(built)}: vLLM, transformers (experts fused, in the family's own format); others refused"
        split = "vLLM, transformers (experts split per expert)" if cls not in fused.VLLM_NAMES else \
            "vLLM (experts split per expert, under vLLM's names; transformers through the builder's loader)"
        shown = split if kind != "fp8-static" else f"{split}, without KV-cache scales"
        return shown if len(built) == len(QUANTS_OF_KIND[kind]) else f"{', '.join(built)}: {shown}; others refused"

    kinds = ("bf16", "fp8-dynamic", "fp8-static", "w8a8-int8", "w4a16", "fp4", "smoothquant", "gguf", "mlx")
    rows = [(f"`{f.model_type}` ({', '.join(f.classes)})", *(cell(f, kind) for kind in kinds))
            for f in families.FAMILIES.values()]
    rows += [(f"`{model_type}` ({cls}), experts fused on disk", *(fused_cell(cls, kind) for kind in kinds))
             for cls, model_type in fused.FUSED_ON_DISK.items()]
    rows.append(("any other decoder-only `*ForCausalLM`", *(cell(families.generic("Other"), kind) for kind in kinds)))
    return markdown(("family", "bf16", "fp8-dynamic, fp8-block", "fp8-static", "w8a8-int8", "w4a16, -gptq",
                     "NVFP4, MXFP4/8, W4AFP8", "SmoothQuant, AWQ", "GGUF", "MLX"), rows)


TABLES = {"supported-models": supported_models_table, "observers": observers_table, "verbs": verbs_table, "parts": parts_table, "recipes": recipes_table, "formats": formats_table,
          "targets": targets_table, "families": families_table}


def blocks() -> list:
    """(document, table name, text between the markers) for every generated block."""
    return [(doc, m.group(2), m.group(3)) for doc in DOCS for m in BLOCK.finditer(doc.read_text())]


def write() -> list:
    """Re-render every generated block in place; returns the documents changed."""
    changed = []
    for doc in DOCS:
        text = doc.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)
        if new != text:
            doc.write_text(new)
            changed.append(doc.relative_to(PROJECT).as_posix())
    return changed


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_table_that_restates_code_is_in_the_docs_as_the_code_renders_it(name):
    found = [(doc, text) for doc, table, text in blocks() if table == name]
    assert found, f"no document holds the generated {name} table"
    for doc, text in found:
        assert text == TABLES[name](), f"{doc.name}'s {name} table is stale: run `python tests/test_docs.py`"


def test_every_generated_block_names_a_known_table():
    assert {table for _, table, _ in blocks()} <= set(TABLES)


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = (PROJECT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    first_block = text.split("```")[1].split("\n", 1)[1]  # after the language name
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "release"], ["make", "test"]]


def test_the_readme_tours_trial_override_resolves(monkeypatch, capsys):
    from builder import cli

    line = next(line for line in (PROJECT / "README.md").read_text().splitlines()
                if line.startswith("builder resolve "))
    monkeypatch.chdir(PROJECT)
    assert cli.main(line.split("#")[0].split()[1:]) == 0, capsys.readouterr().err


def test_the_makefile_has_the_targets_the_readme_promises():
    makefile = (PROJECT / "Makefile").read_text()
    for target in ("release", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M)


def test_every_relative_link_in_the_docs_reaches_a_file():
    for doc in [*DOCS, PROJECT / "BENCHMARKS.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+:", target) and Path(target).name not in PARALLEL:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_every_path_of_the_projects_code_the_docs_name_exists():
    """Named modules, scripts and tests must exist (a moved module must not linger in a guide)."""
    pattern = r"(?<![\w/.-])((?:builder|bench|tests|schemas|\.ci|\.github)/[\w./*-]*[\w*])"
    for doc in OURS:
        for path in set(re.findall(pattern, doc.read_text())):
            assert list(PROJECT.glob(path)), f"{doc.name} names {path}, which does not exist"


def test_every_builder_command_the_docs_show_is_a_verb_of_the_cli():
    from builder.cli import VERBS

    for doc in OURS:
        text = doc.read_text()
        code = "\n".join(text.split("```")[1::2])  # the fenced blocks, where lines are commands
        used = set(re.findall(r"`builder ([a-z][a-z-]*)", text) + re.findall(r"(?:^|\$\(|&& )builder ([a-z][a-z-]*)",
                                                                          code, flags=re.M))
        assert used <= set(VERBS), f"{doc.name} shows builder verbs that do not exist: {used - set(VERBS)}"


def test_the_guides_the_readme_promises_are_linked_from_it():
    readme = (PROJECT / "README.md").read_text()
    for guide in ("models", "recipes", "targets", "reproducibility", "pipeline", "clusters", "provenance"):
        assert f"docs/{guide}.md" in readme


def test_the_architecture_keys_the_models_guide_lists_are_those_model_add_writes():
    from builder.release import families

    config = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "vocab_size": 256, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "attention_bias": True, "mlp_bias": True, "rope_parameters": {"rope_type": "linear", "factor": 2.0},
              "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 1024}  # kv_cache: sliding
    text = (PROJECT / "docs" / "models.md").read_text()
    table = text[text.index("| key | from config.json |"):].split("\n\n")[0].splitlines()[2:]
    listed = {key for row in table for key in re.findall(r"`(\w+)`", row.split(" | ")[0])}
    assert listed == set(families.facts(config))


def test_benchmarks_tables_with_json_behind_them_are_rendered_from_it():
    sys.path.insert(0, str(PROJECT / "bench"))
    import tables

    text = (PROJECT / "BENCHMARKS.md").read_text()
    assert set(tables.TABLES) <= {m.group(2) for m in tables.BLOCK.finditer(text)}
    assert tables.stale(text) == [], "run `python bench/tables.py`"


def test_every_benchmark_section_says_how_to_regenerate_it_and_where_it_was_measured():
    text = (PROJECT / "BENCHMARKS.md").read_text()
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0]
        assert "```bash" in section, f"BENCHMARKS.md, {title}: no command that regenerates it"
        assert re.search(r"[Rr]ecorded in [0-9a-f]{7}", section), f"BENCHMARKS.md, {title}: no commit"


if __name__ == "__main__":
    print("\n".join(f"wrote {path}" for path in write()) or "generated tables are up to date")
