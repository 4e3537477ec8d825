"""Build a release into artifacts/<release>/: load, quantize, export, manifest; atomically.

    builder build smollm2-135m-instruct-fp8-dynamic
"""

from pathlib import Path

from builder import atomic, export, failpoints, load, lock, manifest, provenance
from builder.errors import BuilderError, Problem
from builder.paths import artifact_name
from builder.release_files import write_release_files
from builder.resolve import needs_calibration


def build(root: Path, release: str, overrides: tuple = (), out: Path | None = None,
          force: bool = False, log=print, calibration_dump: Path | None = None) -> dict:
    """Build one release; returns its manifest. Nothing is left behind unless it succeeds.

    calibration_dump: a JSON file (outside the artifact) to receive the calibration maxima, for debugging.
    """
    entry = lock.lock_entry(root, release, tuple(overrides))
    if not overrides:
        require_current_lock(root, release, entry)
    out = (out or root / "artifacts" / artifact_name(entry)).absolute()
    if not force and up_to_date(out, entry):
        log(f"{out.name}: up to date ({entry['artifact_id']}); --force rebuilds")
        return manifest.read(out)
    if out.exists() and not is_artifact(out) and not force:
        raise BuilderError(Problem(str(out), "--out", "exists and is not an artifact; "
                                   "choose another folder or pass --force to replace it"))
    source = prepare(root, entry)  # every input check happens before anything is written
    log(f"{release}: {len(source['tensors'])} tensors from {entry['spec']['model']['path']}")
    with atomic.staging(out, root) as staging:
        if not force and up_to_date(out, entry):  # a concurrent build of the same release finished
            log(f"{out.name}: up to date ({entry['artifact_id']})")
            return manifest.read(out)
        result = build_into(entry, source, staging, root, log, calibration_dump)
        atomic.publish(staging, out)
    log(f"{out.name}: built {result['content_digest']} (artifact_id {entry['artifact_id']})")
    return result


def prepare(root: Path, entry: dict) -> dict:
    """Check the source against the spec and index it; reads only, so bad input writes nothing."""
    spec = entry["spec"]
    path = load.source_dir(root, spec)
    config = load.read_config(path, spec)
    load.check_tokenizer(path, spec["model"]["path"])
    tensors = load.tensor_index(path)
    modules, shapes, tied = load.architecture(path)
    load.check_tensors(spec["model"]["path"], tensors, shapes, tied)
    calibration_ids = data_samples(root, spec, path, "calibration") if needs_calibration(spec["quant"]) else None
    # eval windows are drawn now too: empty or too-short text is refused before anything is quantized
    eval_ids = data_samples(root, spec, path, "eval") if spec["eval"]["dataset"] is not None else None
    failpoints.reached("read")
    return {"path": path, "config": config, "tensors": tensors, "modules": modules,
            "calibration_ids": calibration_ids, "eval_ids": eval_ids}


def data_samples(root: Path, spec: dict, tokenizer_dir: Path, group: str):
    """The tokenized, seeded sample windows of the calibration or eval group."""
    from builder import data

    return data.samples(root, spec[group], tokenizer_dir, file=f"specs/{group}/{spec['choices'][group]}.yaml",
                        group=group)


def build_into(entry: dict, source: dict, staging: Path, root: Path | None = None, log=print,
               calibration_dump: Path | None = None) -> dict:
    """The verbs of a build, top to bottom, writing only into staging.

    root (the repository) is needed by releases that calibrate or evaluate (their data lives there).
    """
    from builder import allocator, calibrate, determinism

    determinism.apply_torch()
    allocator.return_freed_memory()
    spec = entry["spec"]
    calibration = calibrate.for_build(spec, source, log,
                                      calibration_dump)
    export.write_weights(staging, source["tensors"], source["modules"], spec["quant"],
                         spec["target"]["max_shard_bytes"], calibration)
    export.write_config(source["config"], staging, spec["quant"])
    export.copy_side_files(source["path"], staging)
    evaluate_staged(root, spec, source, staging, log)  # before the card, which shows eval.json
    write_release_files(staging, entry)
    provenance.write(entry, source["path"], staging, exclude=manifest.OUTSIDE_DIGEST)
    result = manifest.create(staging, entry)
    failpoints.reached("manifest")
    return result


def evaluate_staged(root: Path, spec: dict, source: dict, staging: Path, log) -> None:
    """When the release asks for it: measure the staged artifact, write eval.json, enforce the gate.

    source is prepare()'s result (its eval_ids were drawn before anything was written).
    """
    from builder import evaluate
    from builder.canonical import pretty_json

    if spec["eval"]["dataset"] is None:
        return
    result = evaluate.evaluate(root, spec, source["path"], staging, log, ids=source["eval_ids"])
    (staging / evaluate.NAME).write_text(pretty_json(result), encoding="utf-8")
    evaluate.require_gate(result, spec)


def require_current_lock(root: Path, release: str, entry: dict) -> None:
    """Refuse to build a release whose committed lock no longer matches specs/ and the toolchain."""
    committed = lock.read(root, release)
    if committed is None or committed["artifact_id"] == entry["artifact_id"]:
        return
    changed = [part for part in ("spec", "inputs") if committed.get(part) != entry[part]]
    if committed.get("inputs", {}).get("toolchain") != entry["inputs"]["toolchain"]:
        changed.append(f"toolchain {committed['inputs']['toolchain']} -> {entry['inputs']['toolchain']}")
    raise BuilderError(Problem(f"locks/{release}.json", "artifact_id",
                               f"stale ({', '.join(changed)} changed); run `builder lock` first"))


def up_to_date(out: Path, entry: dict) -> bool:
    """Whether out already holds this artifact_id (a complete artifact: it has its manifest)."""
    return is_artifact(out) and manifest.read(out).get("artifact_id") == entry["artifact_id"]


def is_artifact(path: Path) -> bool:
    return (path / manifest.NAME).is_file()
