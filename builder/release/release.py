"""A release as one typed value: name, overrides, resolved spec, inputs and artifact_id, with the
questions the stages ask of it. locks/<release>.json is its entry (to_entry / from_entry). Pure.

    from builder.release.lock import locked
    release = locked(root, "smollm2-135m-instruct-fp8-dynamic")
    release.artifact_id, release.artifact_name, release.spec.quant.weights.num_bits, release.devices
"""

from dataclasses import dataclass, field
from pathlib import Path

from builder.paths import artifact_folder, gguf_name
from builder.release.models import Spec
from builder.release.recipe import Recipe

LOCK_SCHEMA = "builder.lock/v2"


@dataclass(frozen=True)
class Release:
    """One release, resolved and locked: what a build reads and an artifact records."""

    name: str              # the file name in specs/release/ (and release.name in the spec)
    overrides: tuple       # Hydra overrides on top of the release file; () for the shipped release
    spec: Spec             # the resolved spec, typed (spec.data() is the dict that is hashed)
    inputs: dict           # weights, data, toolchain, versions: builder/release/identity.py INPUT_KEYS
    artifact_id: str       # "sha256:<hex>" of canonical JSON of spec and inputs
    schema: str = field(default=LOCK_SCHEMA)  # the lock entry's format (older artifacts record older ones)

    @classmethod
    def from_entry(cls, entry: dict) -> "Release":
        """From a lock entry (locks/<release>.json, or the one an artifact's manifest records)."""
        return cls(name=entry["release"], overrides=tuple(entry["overrides"]), spec=Spec.of(entry["spec"]),
                   inputs=entry["inputs"], artifact_id=entry["artifact_id"], schema=entry["schema"])

    def to_entry(self) -> dict:
        """The lock entry: plain data whose pretty JSON is locks/<release>.json, byte for byte."""
        return {"schema": self.schema, "release": self.name, "overrides": list(self.overrides),
                "artifact_id": self.artifact_id, "spec": self.spec.data(), "inputs": self.inputs}

    @property
    def recipe(self) -> Recipe:
        """The quant group as the stages ask it (needs_calibration, scheme_class, parts, ...)."""
        return Recipe.of(self.spec.quant)

    @property
    def artifact_name(self) -> str:
        """The folder name under artifacts/: the release, plus an id prefix when overridden."""
        return artifact_folder(self.name, self.overrides, self.artifact_id)

    def artifact_dir(self, root: Path) -> Path:
        """Where `builder build` writes it by default."""
        return root / "artifacts" / self.artifact_name

    @property
    def lock_file(self) -> str:
        """The committed lock's path, relative to the repository root."""
        return f"locks/{self.name}.json"

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file's name in the artifact; None unless the format is gguf."""
        return gguf_name(self.spec.release.name) if self.spec.quant.format == "gguf" else None

    @property
    def devices(self) -> tuple:
        """The devices a build runs the model on (calibration, evaluation), sorted; () when it runs none."""
        used = {self.spec.calibration.device} if self.recipe.needs_calibration else set()
        if self.spec.eval.dataset is not None:
            used.add(self.spec.eval.device)
        return tuple(sorted(used))

    @property
    def data_files(self) -> dict:
        """group -> the repository-relative text file it reads (calibration, eval), for groups that read one."""
        return {group: getattr(self.spec, group).dataset for group in ("calibration", "eval")
                if getattr(self.spec, group).dataset is not None}
