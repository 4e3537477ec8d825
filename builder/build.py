"""Build a release into artifacts/<release>/, atomically: prepare (check every input), calibrate,
search weight scales, quantize and write, evaluate, describe, record. Also rebuild an artifact from what it records.

    builder build smollm2-135m-instruct-fp8-dynamic
    builder verify --rebuild artifacts/smollm2-135m-instruct-fp8-dynamic
"""

import tempfile
import time
from pathlib import Path

from builder import atomic, determinism, failpoints, formats
from builder.artifact import buildinfo, manifest, provenance, record
from builder.artifact.export import write_model
from builder.artifact.release_files import write_release_files
from builder.canonical import file_entries, pretty_json, tree_digest
from builder.check import smoke
from builder.errors import BuilderError, CheckFailed, Problem
from builder.paths import EVAL_FILE, MANIFEST_FILE, RECORD_FILES
from builder.release import families, lock
from builder.release.release import Release
from builder.source import load
from builder.source.inputs import BuildInputs


def build(root: Path, release: str, overrides: tuple = (), out: Path | None = None,
          force: bool = False, log=print, calibration_dump: Path | None = None) -> dict:
    """Build one release; returns its manifest. Nothing is left behind unless it succeeds.

    calibration_dump: a JSON file (outside the artifact) to receive the calibration maxima, for debugging.
    """
    locked = lock.locked(root, release, tuple(overrides))
    if not overrides:
        require_current_lock(root, locked)
    out = (out or locked.artifact_dir(root)).absolute()
    if not force and up_to_date(out, locked):
        log(f"{out.name}: up to date (artifact_id {locked.artifact_id}); --force rebuilds")
        return record.read(out).manifest
    if out.exists() and not record.is_artifact(out) and not force:
        raise BuilderError(Problem(str(out), "--out", "exists and is not an artifact; "
                                   "choose another folder or pass --force to replace it"))
    started = time.time()
    source = prepare(root, locked)  # every input check happens before anything is written
    log(f"{release}: {len(source.tensors)} tensors from {locked.spec.model.path}")
    with atomic.staging(out, root) as staging:
        if not force and up_to_date(out, locked):  # a concurrent build of the same release finished
            log(f"{out.name}: up to date (artifact_id {locked.artifact_id})")
            return record.read(out).manifest
        result = build_into(locked, source, staging, root, log, calibration_dump)
        atomic.publish(staging, out)
        buildinfo.write(out, result, started, determinism.device_facts(source.devices))  # who built it, beside out
    log(f"{out.name}: built {result['content_digest']} (artifact_id {locked.artifact_id})")
    return result


def prepare(root: Path, release: Release) -> BuildInputs:
    """Check the source against the spec and index it; reads only, so bad input writes nothing.

    The pinned digest is checked as the weights are read (build_into), not by a read of its own; an
    error here is the digest's refusal when the source is not the pinned one (inputs.digest)."""
    path, digest = load.source_folder(root, release.spec.data())
    try:
        return checked_inputs(root, release, path, digest)
    except Exception as error:
        digest.refuse_if_differs(error)
        raise


def checked_inputs(root: Path, release: Release, path: Path, digest) -> BuildInputs:
    """prepare()'s checks and index of the source folder at path."""
    spec, model = release.spec.data(), release.spec.model
    model_file = f"specs/model/{release.spec.choices.model}.yaml"
    config = load.read_config(path, model_file)
    load.check_tokenizer(path, model.path)
    tensors = load.tensor_index(path)
    architecture = load.with_mtp(load.architecture(path), tensors, model.path)
    load.check_architecture(spec["model"]["architecture"], architecture["facts"], model_file)
    load.check_tensors(model.path, tensors, architecture["shapes"], architecture["tied"])
    recipe = release.recipe
    devices = determinism.devices(release)  # a CUDA device asked for where there is none: refused now
    calibration_ids = data_samples(root, spec, path, "calibration") if recipe.needs_calibration else None
    # eval windows are drawn now too: empty or too-short text is refused before anything is quantized
    eval_ids = data_samples(root, spec, path, "eval") if release.spec.eval.dataset is not None else None
    layout = formats.of(recipe.format).prepare(path, config, spec)  # what its format reads first
    failpoints.reached("read")
    return BuildInputs(path=path, config=config, tensors=tensors, modules=architecture["modules"],
                       family=families.of_class(architecture["facts"]["class"]), facts=architecture["facts"],
                       recipe=recipe, devices=devices, calibration_ids=calibration_ids, eval_ids=eval_ids,
                       layout=layout, digest=digest)


def data_samples(root: Path, spec: dict, tokenizer_dir: Path, group: str):
    """The tokenized, seeded sample windows of the calibration or eval group."""
    from builder.source import data

    return data.samples(root, spec[group], tokenizer_dir, file=f"specs/{group}/{spec['choices'][group]}.yaml",
                        group=group)


def build_into(release: Release, source: BuildInputs, staging: Path, root: Path | None = None, log=print,
               calibration_dump: Path | None = None) -> dict:
    """The verbs of a build, top to bottom, writing only into staging; the source's digest checked
    (as its weights were read) before the artifact is evaluated and described.

    root (the repository) is needed by releases that calibrate or evaluate (their data lives there).
    A source that is not the pinned one fails with the digest's refusal, whatever broke first.
    """
    try:
        return build_steps(release, source, staging, root, log, calibration_dump)
    except Exception as error:
        source.digest.refuse_if_differs(error)
        raise


def build_steps(release: Release, source: BuildInputs, staging: Path, root: Path | None, log,
                calibration_dump: Path | None) -> dict:
    """build_into()'s verbs."""
    from builder import allocator
    from builder.quant import calibrate, observe

    determinism.apply_torch(source.devices)
    allocator.return_freed_memory()
    spec, recipe = release.spec.data(), source.recipe
    # GPTQ's per-layer results, beside staging and named after it, so a killed build's are cleaned up with it
    with tempfile.TemporaryDirectory(prefix=f"{staging.name}-scratch-", dir=staging.parent) as scratch:
        calibration = calibrate.for_build(recipe, source, log, calibration_dump, release.spec.calibration.device,
                                          Path(scratch))
        calibration = observe.searched_scales(recipe, source.tensors, source.modules, calibration)
        weights = write_model(staging, spec, source, calibration)  # entries of files hashed as written
    source.digest.check()  # the source read (and hashed) by now: refused here if it is not the pinned one
    evaluate_staged(root, spec, source, staging, log, release.overrides)  # before the card, which shows eval.json
    write_release_files(staging, release)
    smoke.check(staging, release.artifact_name, log, parameters=source.parameters)  # a failure publishes nothing
    # each file hashed once (the weights while they were written), for both records
    content = file_entries(staging, exclude=RECORD_FILES, known={e["path"]: e for e in weights})
    provenance.write(release, source.path, staging, content)
    result = manifest.create(staging, release, content)
    failpoints.reached("manifest")
    return result


def evaluate_staged(root: Path, spec: dict, source: BuildInputs, staging: Path, log, overrides=()) -> None:
    """Measure the staged artifact against its source when the release has an eval group; a missed
    gate raises CheckFailed before anything is moved into place, naming the file that set the limit
    (the release file, an override or the eval group's file).

    source is prepare()'s result (its eval_ids were drawn before anything was written).
    """
    from builder.check import evaluate

    if spec["eval"]["dataset"] is None:
        return
    result = evaluate.evaluate(root, spec, source.path, staging, log, ids=source.eval_ids)
    (staging / EVAL_FILE).write_text(pretty_json(result), encoding="utf-8")
    evaluate.require_gate(result, spec, root, overrides)


def require_current_lock(root: Path, release: Release) -> None:
    """Refuse to build a release whose committed lock no longer matches specs/ and the toolchain."""
    committed = lock.read(root, release.name)  # plain data: a lock of an older shape is still compared
    if committed is None or committed["artifact_id"] == release.artifact_id:
        return
    raise BuilderError(Problem(release.lock_file, "artifact_id",
                               f"stale ({lock.describe(lock.differences(committed, release.to_entry()))} changed); "
                               "run `builder lock` first"))


def up_to_date(out: Path, release: Release) -> bool:
    """Whether out already holds this artifact_id (a complete artifact: it has its manifest)."""
    return record.is_artifact(out) and record.read(out, strict=False).manifest.get("artifact_id") == release.artifact_id


def rebuild(root: Path, artifact: Path, log=print) -> dict:
    """Rebuild an artifact from what it records (not from today's specs) in a temporary folder and
    compare its content; raise CheckFailed naming the first differing file (and tensor)."""
    from builder.check import compare

    where = f"{artifact.name}/{MANIFEST_FILE}"
    recorded = record.read(artifact).release()
    problems = compare.input_problems(root, recorded, where)
    if problems:
        raise BuilderError(problems)
    source = prepare(root, recorded)
    with tempfile.TemporaryDirectory(prefix="builder-rebuild-") as temporary:
        staging = Path(temporary) / artifact.name
        staging.mkdir()
        log(f"{artifact.name}: rebuilding {recorded.artifact_id} in a temporary folder")
        rebuilt = build_into(recorded, source, staging, root, log)
        difference = compare.first_difference(artifact, staging)
    if difference:
        present = tree_digest(file_entries(artifact, exclude=RECORD_FILES))
        raise CheckFailed(Problem(f"{artifact.name}/{difference[0]}", "", difference[1] +
                                  f"; rebuilt content digest {rebuilt['content_digest']}, on disk {present}"))
    return {"artifact": artifact.name, "content_digest": rebuilt["content_digest"], "files": len(rebuilt["files"])}


def job(root: str, release: str, force: bool) -> dict:
    """One release built in a job process of its own (builder build-many): the same build as
    `builder build RELEASE`; bad input or a failed check comes back as a value the submitter
    reports, with the exit code `builder build` would give."""
    import os

    from builder import determinism
    from builder.console import log

    determinism.apply_environment()  # before the build imports torch in this fresh process
    try:
        result = build(Path(root), release, force=force, log=log)
    except BuilderError as error:
        return {"release": release, "error": error.render(), "exit_code": error.exit_code, "pid": os.getpid()}
    return {"release": release, "content_digest": result["content_digest"],
            "artifact_id": result["artifact_id"], "pid": os.getpid()}
