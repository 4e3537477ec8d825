"""A build's inputs as one typed value: what builder/build.py prepare() read and checked before anything
is written, handed to calibration, the writers and evaluation.

    inputs = build.prepare(root, release)
    inputs.tensors["model.norm.weight"].shape, inputs.recipe.format, inputs.devices
"""

import math
from dataclasses import dataclass
from pathlib import Path

from builder.release.families import Family
from builder.release.recipe import Recipe


@dataclass(frozen=True, eq=False)
class BuildInputs:
    """The source checkpoint, indexed and checked against the spec, and what the recipe will need of it."""

    path: Path              # the source checkpoint folder (inside the repository, no pickles)
    config: dict            # its config.json
    tensors: dict           # tensor index: name -> tensorfile.StoredTensor (file, dtype code, shape)
    modules: dict           # module name (as the checkpoint names it) -> class name
    family: Family          # the model family (builder/release/families.py)
    facts: dict             # what config.json means: the architecture block (families.facts)
    recipe: Recipe          # the quant group as the stages ask it
    devices: tuple          # where the model runs (calibration, evaluation), sorted; () when it runs nowhere
    calibration_ids: object  # torch LongTensor [samples, length] of calibration tokens; None: no calibration
    eval_ids: object        # the same for evaluation; None when the release has no eval dataset
    layout: dict            # what the output format read from the source first (formats' prepare())
    digest: object          # builder.source.digest.StreamedDigest: the pinned digest, checked as the weights
                            # are read (digest.check() before anything is published)

    @property
    def parameters(self) -> int:
        """The source's parameter count: every stored tensor's elements."""
        return sum(math.prod(stored.shape) for stored in self.tensors.values())
