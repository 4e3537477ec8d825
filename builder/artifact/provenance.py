"""provenance.json: an in-toto Statement v1 with a SLSA provenance v1 predicate, written by every build.

    builder build R writes it; builder verify checks its subjects; builder audit reads it

Everything in it follows from the release (its lock entry) and the content files, so the folder DVC tracks is a
function of the artifact_id: who ran the build (builder version and source digest, host, GPU, clock)
goes to <artifact>.buildinfo.json beside the folder (builder/artifact/buildinfo.py).
"""

import hashlib
import json
from pathlib import Path

from builder import determinism
from builder.canonical import canonical_json, pretty_json, sha256_bytes, sha256_file
from builder.errors import Problem
from builder.paths import PROVENANCE_FILE, SCHEMAS_DIR
from builder.release.release import Release

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
# Documented in docs/provenance.md: what externalParameters, internalParameters and
# resolvedDependencies hold for a release build. A URN: the project has no web home to point at.
BUILD_TYPE = "urn:quant-release-builder:build-type:release:v3"
# The builder as a package, without its version: any version with the same output versions writes
# the same bytes (the buildinfo beside the artifact names the version that ran).
BUILDER_ID = "pkg:pypi/quant-release-builder"
SCHEMAS = {"statement": "in-toto-statement.schema.json", "predicate": "slsa-provenance-v1.schema.json"}
# Tokenizer files of a source checkpoint, listed one by one (they are also inside the weights digest).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def hex_digest(digest: str) -> str:
    """'sha256:abc…' -> 'abc…' (in-toto DigestSets hold bare hex)."""
    return digest.split(":", 1)[1]


def git_blob(data: bytes) -> str:
    """The git blob id of data: what `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def subjects(files: list) -> list:
    """The artifact's content files ({path, sha256, size} entries) as in-toto ResourceDescriptors."""
    return [{"name": entry["path"], "digest": {"sha256": hex_digest(entry["sha256"])}} for entry in files]


def dependencies(release: Release, weights: Path) -> list:
    """resolvedDependencies: source weights (+ its origin), tokenizer files, data, the builder (the
    output versions of the parts the release runs, as the artifact_id carries them), toolchain."""
    inputs, model = release.inputs, release.spec.model.data()
    found = [{"name": "weights", "uri": inputs["weights"]["path"],
              "digest": {"sha256": hex_digest(inputs["weights"]["digest"])},
              "annotations": {"digestOf": "tree", "model": model["id"],
                              **({"revision": model["revision"]} if model.get("revision") else {})}}]
    source = model.get("source", {})
    if source.get("sha256"):
        uri = source["file"]
        if source.get("package"):  # a file shipped in a PyPI package: a purl with the file as subpath
            uri = f"pkg:pypi/{source['package'].replace('==', '@')}#{source['file']}"
        found.append({"name": "source", "uri": uri,
                      "digest": {"sha256": hex_digest(source["sha256"])},
                      "annotations": {"digestOf": "file", "kind": source["kind"]}})
    for name in TOKENIZER_FILES:
        path = weights / name
        if path.is_file():
            found.append({"name": f"tokenizer/{name}", "uri": f"{inputs['weights']['path']}/{name}",
                          "digest": {"sha256": hex_digest(sha256_file(path))},
                          "annotations": {"digestOf": "file"}})
    for group, relative in release.data_files.items():  # the data files the spec names, by the role they play
        found.append({"name": group, "uri": relative, "digest": {"sha256": hex_digest(inputs["data"][relative])},
                      "annotations": {"digestOf": "file"}})
    versions = inputs["versions"]
    found.append({"name": "builder", "uri": BUILDER_ID,
                  "digest": {"sha256": hex_digest(sha256_bytes(canonical_json(versions)))},
                  "annotations": {"digestOf": "canonical-json", "outputVersions": versions}})
    toolchain = inputs["toolchain"]
    found.append({"name": "toolchain", "digest": {"sha256": hex_digest(sha256_bytes(canonical_json(toolchain)))},
                  "annotations": {"digestOf": "canonical-json", "versions": toolchain}})
    return found


def statement(release: Release, weights: Path, files: list) -> dict:
    """The provenance of the artifact in out, from its release. No clock, host or absolute path."""
    lock_text = pretty_json(release.to_entry()).encode("utf-8")  # locks/<release>.json's bytes when it is current
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects(files),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "release": release.name,
                    "overrides": list(release.overrides),
                    "spec": {"digest": {"sha256": hex_digest(sha256_bytes(canonical_json(release.spec.data())))}},
                    "lock": {"uri": release.lock_file,
                             "digest": {"sha256": hex_digest(sha256_bytes(lock_text)),
                                        "gitBlob": git_blob(lock_text)}},
                },
                "internalParameters": {"artifact_id": release.artifact_id, **determinism.settings()},
                "resolvedDependencies": dependencies(release, weights),
            },
            "runDetails": {"builder": {"id": BUILDER_ID}},
        },
    }


def write(release: Release, weights: Path, out: Path, files: list) -> dict:
    """Write provenance.json into out.

    Args:
        weights: the source checkpoint folder, already checked against the pinned digest.
        files: the content files' entries (subjects), hashed once by the build.
    """
    document = statement(release, weights, files)
    (out / PROVENANCE_FILE).write_text(pretty_json(document), encoding="utf-8")
    return document


def schema_problems(document: dict, where: str) -> list:
    """Problems of document against the in-toto Statement and SLSA provenance v1 schemas."""
    from jsonschema import Draft202012Validator

    problems = []
    for part, value in (("statement", document), ("predicate", document.get("predicate"))):
        schema = json.loads((SCHEMAS_DIR / SCHEMAS[part]).read_text(encoding="utf-8"))
        for error in sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path)):
            key = ".".join(str(p) for p in ([] if part == "statement" else ["predicate"]) + list(error.path))
            problems.append(Problem(where, key, error.message))
    return problems


def subject_problems(document: dict, actual: list, where: str) -> list:
    """Files whose sha256 differs from the subject, and subjects or files without a counterpart.

    actual: file entries ({path, sha256, size}) of the artifact, without provenance.json and manifest.json.
    """
    claimed = {s["name"]: s["digest"].get("sha256") for s in document.get("subject", [])}
    present = {e["path"]: hex_digest(e["sha256"]) for e in actual}
    problems = [Problem(f"{where}/{path}", "", "missing (provenance.json lists it as a subject)")
                for path in sorted(set(claimed) - set(present))]
    problems += [Problem(f"{where}/{path}", "", "not a subject of provenance.json")
                 for path in sorted(set(present) - set(claimed))]
    problems += [Problem(f"{where}/{path}", "", f"sha256 {present[path]} differs from provenance.json's "
                         f"subject {claimed[path]}")
                 for path in sorted(set(claimed) & set(present)) if claimed[path] != present[path]]
    return problems
