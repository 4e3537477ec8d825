"""What calibration found, as one typed value: a field per result key the steps fill (Step.results), read
by the writers (quantize, the formats) by name. builder/quant/calibrate.py makes it.

    found = calibrate.calibrate(...)
    found.input_amax["model.layers.0.self_attn.q_proj"], found.gptq.get(module), found.smoothing
"""

from dataclasses import dataclass, field, fields


@dataclass(frozen=True, eq=False)
class Calibration:
    """Every result by module or tensor (checkpoint names), on the CPU; empty where no step filled it."""

    input_amax: dict = field(default_factory=dict)   # module -> max |input| ([1], FP32): statistics
    kv_amax: dict = field(default_factory=dict)      # "model.layers.N.self_attn.k_scale" -> max |k| ([1], FP32)
    gptq: object = field(default_factory=dict)       # module -> (values, scale): GPTQ (a Spill when spilled)
    imatrix: dict = field(default_factory=dict)      # module -> E[x²] per input column (imatrix_mse, FP32 sums)
    importance: dict = field(default_factory=dict)   # module -> E[x²] per input feature (llama.cpp's, FP64 sums)
    smoothing: dict = field(default_factory=dict)    # tensor -> SmoothQuant's or AWQ's factor per input channel
    weight_scale: dict = field(default_factory=dict)  # module -> searched weight scale (observe.searched_scales)
    other: dict = field(default_factory=dict)        # key -> results of a step whose key no field above names

    @classmethod
    def of(cls, found: dict) -> "Calibration":
        """From {result key: {name: value}}: the named keys to their fields, any other key under other."""
        named = {f.name for f in fields(cls)} - {"other"}
        return cls(**{key: value for key, value in found.items() if key in named},
                   other={key: value for key, value in found.items() if key not in named})
