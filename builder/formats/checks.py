"""Resolve-time rules more than one format shares: an unquantized recipe, and a runtime's own integer types. Pure."""


def unquantized(recipe) -> list:
    """A recipe that quantizes nothing (format dense, or a GGUF / MLX file of unquantized tensors)
    sets no quantization key, as (key path, message)."""
    reason = "format is dense" if recipe.format == "dense" else "weights is null"
    return [(("quant", key), f"must be null when {reason}")
            for key in ("algorithm", "gptq", "weights", "input_activations", "kv_cache_scheme")
            if getattr(recipe, key) is not None]


def runtime_types(recipe, allowed: str, fits, algorithms: tuple) -> list:
    """What a GGUF or MLX recipe may hold: weight arguments of the runtime's own integer types
    (fits(weights) says whether they are one), no activation or KV-cache quantization, and the
    algorithms the format has."""
    found = []
    if not fits(recipe.weights) or recipe.weights.dynamic:
        found.append((("quant", "weights"), f"{recipe.weights.words()}: format {recipe.format} writes {allowed}"))
    for key in ("input_activations", "kv_cache_scheme"):
        if getattr(recipe, key) is not None:
            found.append((("quant", key), f"must be null with format {recipe.format}: the runtime "
                          "quantizes activations and its KV cache itself, at run time"))
    if not recipe.targets:
        found.append((("quant", "targets"), "empty: name the modules to quantize, e.g. [Linear]"))
    if recipe.algorithm not in algorithms:
        found.append((("quant", "algorithm"), f"{recipe.algorithm}: format {recipe.format} with "
                      f"{recipe.weights.num_bits}-bit weights takes {' or '.join(algorithms)}"))
    if recipe.gptq is not None:
        found.append((("quant", "gptq"), f"must be null with format {recipe.format}"))
    return found
