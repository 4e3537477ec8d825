"""<artifact>.buildinfo.json: who built an artifact, beside its folder, never inside what DVC tracks.

    builder build R writes artifacts/R.buildinfo.json; builder audit artifacts/R shows it

An in-toto Statement v1 with a SLSA provenance v1 predicate, like provenance.json, but for one run:
its subjects are every file of the folder (the records included), its buildDefinition is provenance.json's,
and its runDetails say who ran it: the builder's version and source digest, the host, the GPU (model,
driver, CUDA) and when it started and finished. Two builders of one artifact_id write the same folder and each its own buildinfo,
as Debian's .buildinfo sits beside a bit-identical package (docs/provenance.md says why).
"""

import json
import os
import platform
import socket
import sys
import time
import uuid
from pathlib import Path

import builder
from builder import atomic
from builder.artifact import provenance
from builder.canonical import canonical_json, file_entry, pretty_json, sha256_bytes
from builder.paths import MANIFEST_FILE, PROVENANCE_FILE
from builder.release.identity import builder_digest

SUFFIX = ".buildinfo.json"
BUILDER_ID = f"{provenance.BUILDER_ID}@{builder.__version__}"


def path(artifact: Path) -> Path:
    """Where the buildinfo of an artifact folder lives: <artifact>.buildinfo.json beside it."""
    return artifact.parent / f"{artifact.name}{SUFFIX}"


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def host_facts() -> dict:
    """The machine that ran the build (nothing of it enters the artifact)."""
    return {"hostname": socket.gethostname(), "machine": platform.machine(), "platform": platform.platform(),
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


def described(name: str, facts: dict) -> dict:
    """A byproduct ResourceDescriptor of facts (a descriptor needs a digest: that of the facts' JSON)."""
    return {"name": name, "digest": {"sha256": provenance.hex_digest(sha256_bytes(canonical_json(facts)))},
            "annotations": {"digestOf": "canonical-json", **dict(sorted(facts.items()))}}


def statement(artifact: Path, files: list, started: float, finished: float, device: dict) -> dict:
    """The run's statement: every file of the published folder (files: their entries, as the build
    hashed them), the folder's own build definition."""
    definition = json.loads((artifact / PROVENANCE_FILE).read_text(encoding="utf-8"))["predicate"]["buildDefinition"]
    byproducts = [described("host", host_facts())] + ([described("device", device)] if device else [])
    return {
        "_type": provenance.STATEMENT_TYPE,
        "subject": provenance.subjects(sorted(files, key=lambda entry: entry["path"])),
        "predicateType": provenance.PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": definition,
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"quant-release-builder": builder.__version__},
                            "builderDependencies": [{"name": "source", "uri": provenance.BUILDER_ID,
                                                     "digest": {"sha256": provenance.hex_digest(builder_digest())},
                                                     "annotations": {"digestOf": "tree"}}]},
                "metadata": {"invocationId": str(uuid.uuid4()), "startedOn": rfc3339(started),
                             "finishedOn": rfc3339(finished)},
                "byproducts": byproducts,
            },
        },
    }


def write(artifact: Path, manifest: dict, started: float, device: dict) -> dict:
    """Write the buildinfo of a published artifact beside it (atomically); returns it.

    manifest: the artifact's manifest (its files and records were hashed once, by the build; only
    manifest.json itself is hashed here); started: when the build began (seconds since the epoch);
    device: determinism.device_facts.
    """
    files = [*manifest["files"], *manifest["records"], file_entry(artifact, MANIFEST_FILE)]
    document = statement(artifact, files, started, time.time(), device)
    atomic.write_text(path(artifact), pretty_json(document))
    return document


def read(artifact: Path) -> dict | None:
    """The buildinfo beside an artifact, or None where there is none (built elsewhere, fetched by DVC)."""
    try:
        value = json.loads(path(artifact).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def summary(document: dict | None) -> dict:
    """Who built it, as audit shows it: builder version and source digest, host, device, when."""
    if document is None:
        return {}
    run = document.get("predicate", {}).get("runDetails", {})
    found = {"builder": run.get("builder", {}).get("id"),
             "source": next((d.get("digest", {}).get("sha256") for d in run.get("builder", {})
                            .get("builderDependencies", []) if d.get("name") == "source"), None),
             "started": run.get("metadata", {}).get("startedOn"),
             "finished": run.get("metadata", {}).get("finishedOn")}
    for product in run.get("byproducts", []):
        found[product.get("name")] = {k: v for k, v in product.get("annotations", {}).items() if k != "digestOf"}
    return found
