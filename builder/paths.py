"""Where things live: the repository root, paths in specs kept inside it, and an artifact's file names."""

import os
from pathlib import Path

from builder.errors import BuilderError, Problem

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMAS_DIR = PACKAGE_DIR.parent / "schemas"

# The files an artifact holds besides its weights, config and tokenizer.
RELEASE_FILE = "release.json"        # the resolved spec
MANIFEST_FILE = "manifest.json"      # artifact_id, inputs, every content file's sha256, content digest
PROVENANCE_FILE = "provenance.json"  # in-toto / SLSA statement: what went in (who ran it: buildinfo.py)
EVAL_FILE = "eval.json"              # quality measured at build time
SERVE_FILE = "serve.json"            # runtime arguments
CARD_FILE = "README.md"              # the model card
# Files about the content rather than content: the content digest covers every other file (the
# manifest holds the digest; provenance lists the content files as its subjects).
RECORD_FILES = frozenset({MANIFEST_FILE, PROVENANCE_FILE})


def find_root(start: Path | None = None) -> Path:
    """The nearest ancestor of start (default: the working directory) that holds specs/config.yaml.

    BUILDER_ROOT, when set, names the root directly.
    """
    if os.environ.get("BUILDER_ROOT"):
        root = Path(os.environ["BUILDER_ROOT"]).resolve()
        if not (root / "specs" / "config.yaml").is_file():
            raise BuilderError(Problem(str(root), "BUILDER_ROOT", "has no specs/config.yaml"))
        return root
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "specs" / "config.yaml").is_file():
            return candidate
    raise BuilderError(Problem(str(here), "", "not inside a release repository "
                               "(no specs/config.yaml here or above); cd into one or set BUILDER_ROOT"))


def inside(root: Path, relative: str, *, file: str, key: str) -> Path:
    """Resolve a repository-relative path from a spec, refusing anything that leaves the root."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BuilderError(Problem(file, key, f"{relative!r} points outside the repository "
                                   "(through '..' or a symbolic link); keep inputs inside it"))
    return path


def artifact_folder(release: str, overrides, artifact_id: str) -> str:
    """The artifact's folder name under artifacts/: the release, plus an id prefix when overridden
    (builder.release.release.Release.artifact_name)."""
    suffix = f"-{artifact_id.split(':')[1][:12]}" if overrides else ""
    return f"{release}{suffix}"


def gguf_name(release: str) -> str:
    """The GGUF file's name in a gguf artifact: the release's name, since the file travels alone."""
    return f"{release}.gguf"
