"""The `builder` command line: one function per verb, one dict from verb to function.

    builder list | resolve | lock | plan | import | build | build-many | verify | audit | sign | eval
    | summary
    (builder VERB --help)

Each verb's function is here; the work it calls lives one level down: builder/build.py (build,
rebuild), builder/release/ (resolve, lock), builder/source/ (import), builder/check/ (verify, audit,
sign, summary), builder/check/evaluate.py (eval), builder/pipeline/ (plan, build-many).
"""

import argparse
import json
import re
import signal
import sys
from pathlib import Path

import yaml

from builder import atomic, console, determinism
from builder.canonical import pretty_json
from builder.console import log
from builder.errors import BuilderError, Problem
from builder.paths import find_root


def cmd_list(args) -> int:
    from builder.release.catalog import release_row
    from builder.release.resolve import list_releases

    root = find_root()
    if args.names:
        print("\n".join(list_releases(root)))
        return 0
    rows = [release_row(root, name) for name in list_releases(root)]
    sys.stdout.write(pretty_json(rows) if args.json else console.table(rows, ("release", "recipe", "target",
                                                                             "description")))
    return 0


def cmd_resolve(args) -> int:
    from builder.release.lock import locked

    release = locked(find_root(), args.release, tuple(args.overrides))
    spec = release.spec.data()
    if args.json:
        sys.stdout.write(pretty_json({"artifact_id": release.artifact_id, "spec": spec, "inputs": release.inputs}))
    else:
        sys.stdout.write(yaml.safe_dump(spec, sort_keys=True))
        print(f"# artifact_id: {release.artifact_id}")
    return 0


def cmd_lock(args) -> int:
    from builder.release import lock

    root = find_root()
    if args.check:
        lock.check(root)
        print("locks/ and params.yaml are up to date")
        return 0
    changed = lock.write(root)
    print("\n".join(f"wrote {path}" for path in changed) or "locks/ and params.yaml are up to date")
    return 0


def cmd_plan(args) -> int:
    from builder.pipeline import plan

    report = plan.plan(find_root(), args.base)
    sys.stdout.write(pretty_json(report) if args.json else plan.markdown(report))
    return 0


def cmd_import(args) -> int:
    from builder.source.importer import import_model

    import_model(find_root(), args.model, log=log)
    return 0


def cmd_model(args) -> int:
    from builder.source.onboard import add_model

    add_model(find_root(), args.name, args.path, model_id=args.id, license_id=args.license, force=args.force, log=log)
    return 0


def cmd_build(args) -> int:
    from builder.build import build
    from builder.paths import artifact_folder

    root = find_root()
    manifest = build(root, args.release, tuple(args.overrides), out=args.out, force=args.force,
                               log=log, calibration_dump=args.calibration_stats)
    folder = artifact_folder(manifest["release"], manifest["overrides"], manifest["artifact_id"])
    path = console.shown_path(args.out or root / "artifacts" / folder)
    result = {"path": path, "release": manifest["release"], "artifact_id": manifest["artifact_id"],
              "content_digest": manifest["content_digest"]}
    print(pretty_json(result).rstrip() if args.json else path)
    log(console.built(result, serve_command(Path(path))))
    return 0


def serve_command(artifact: Path) -> str | None:
    """The command line serve.json gives for the artifact's runtime, when it has one, pointed at where
    this artifact is (serve.json names its place in the repository, artifacts/<name>, whatever --out was)."""
    import shlex

    from builder.paths import SERVE_FILE

    try:
        serve = json.loads((artifact / SERVE_FILE).read_text(encoding="utf-8"))
        command, model = serve["command"], serve["model"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    here = artifact.joinpath(*model.split("/", 2)[2:])  # artifacts/<name>[/<file>, for GGUF]
    return command.replace(shlex.quote(model), shlex.quote(str(here)), 1)


def cmd_build_many(args) -> int:
    from builder.build import job
    from builder.pipeline import fanout

    if args.stale == bool(args.releases):
        raise BuilderError(Problem("build-many", "RELEASE", "name the releases to build, or pass --stale "
                                   "(what `dvc status` reports changed), not both"))
    slurm = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in args.slurm)}
    if args.stale:
        results = fanout.build_stale(find_root(), job, args.launcher, slurm, args.force, log=log)
    else:
        results = fanout.build_many(find_root(), args.releases, job, args.launcher, slurm, args.force, log=log)
    for result in results:
        print(f"{result['release']} {result['content_digest']}")
    return 0


def cmd_verify(args) -> int:
    from builder.check.verify import verify

    result = verify(args.artifact)
    print(f"OK {result['artifact']}: {result['files']} files match, content digest {result['content_digest']}")
    if args.signature or args.key:
        from builder.check import signing

        if not args.key:
            raise BuilderError(Problem("", "--key", "--signature needs --key PUBLIC.pem (the signer's P-256 key)"))
        signature = args.signature or signing.signature_path(args.artifact)
        signing.verify_signature(args.artifact, signature, args.key)
        print(f"OK {signature.name}: valid signature of {args.artifact.name} by the key in {args.key}")
    if args.rebuild:
        from builder.build import rebuild

        rebuilt = rebuild(find_root(), args.artifact, log=log)
        print(f"OK {rebuilt['artifact']}: rebuilt bit for bit, {rebuilt['files']} files, "
              f"content digest {rebuilt['content_digest']}")
    return 0


def cmd_audit(args) -> int:
    from builder.check import audit

    try:
        root = find_root()
    except BuilderError:
        root = None  # an artifact audited outside any release repository: inputs are not compared
    report = audit.audit(args.artifact, root, public_key=args.key, signature=args.signature)
    sys.stdout.write(audit.as_json(report) if args.json else audit.render(report))
    return 0 if report["holds"] else 1


def cmd_sign(args) -> int:
    from builder.check.signing import sign

    signature = sign(args.artifact, args.key, args.signature)
    print(f"signed {args.artifact.name}: {signature}")
    return 0


def cmd_eval(args) -> int:
    from builder.artifact import record
    from builder.check import evaluate

    recorded, root = record.read(args.artifact), find_root()
    result, spec, overrides = evaluate.evaluate_artifact(root, args.artifact, recorded.spec,
                                                         recorded.manifest.get("overrides", []), args.eval, log=log)
    text = pretty_json(result)
    if args.out:
        atomic.write_text(args.out, text)
    else:
        sys.stdout.write(text)
    evaluate.require_gate(result, spec, root, overrides)
    return 0


def cmd_summary(args) -> int:
    from builder.check import summary

    result = summary.summarize(args.artifact, details=args.details)
    sys.stdout.write(pretty_json(result) if args.json else summary.render(result))
    return 0


def cmd_report(args) -> int:
    from builder.check import report

    root = find_root()
    result = report.report(root, args.releases, args.out or root / "reports", log=log)
    print("\n".join(f"wrote {path}" for path in result["files"]))
    return 0


VERBS = {
    "list": (cmd_list, "the releases: name, recipe, target and a line of description (--names: names only)"),
    "resolve": (cmd_resolve, "show a release's resolved spec and artifact_id"),
    "lock": (cmd_lock, "write locks/ and params.yaml from specs/ (--check: fail if stale)"),
    "plan": (cmd_plan, "which releases change against a git revision, as Markdown for a PR comment"),
    "model": (cmd_model, "add a local checkpoint folder as specs/model/NAME.yaml (checked, digest pinned)"),
    "import": (cmd_import, "import a model's pinned source into weights/"),
    "build": (cmd_build, "build a release into artifacts/<release>/; prints its path, then what to run next"),
    "build-many": (cmd_build_many, "build several releases in parallel jobs (submitit: local or SLURM)"),
    "verify": (cmd_verify, "re-hash an artifact's files against its manifest (--rebuild, --signature)"),
    "audit": (cmd_audit, "what an artifact was built from, and whether each claim still holds"),
    "sign": (cmd_sign, "sign an artifact with a P-256 private key (writes <artifact>.sig beside it)"),
    "eval": (cmd_eval, "perplexity and mean KL of an artifact against its source model (exit 1: gate missed)"),
    "summary": (cmd_summary, "bytes per dtype; per-layer dtypes, shapes and scale statistics (--details)"),
    "report": (cmd_report, "an HTML page (and PNGs) of releases: bits per weight against quality, the Pareto front"),
}


def key_value(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error shows the command's whole help before the error (exit 2)."""

    def error(self, message):
        self.print_help(sys.stderr)
        self.exit(2, f"\n{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="builder", description="Reproducible builds of quantized LLM releases.",
                 epilog="builder VERB --help says more; README.md has a five-minute tour.")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub = {name: verbs.add_parser(name, help=text, description=text) for name, (_, text) in VERBS.items()}
    for name in ("resolve", "build"):
        sub[name].add_argument("release", metavar="RELEASE", help="a file name in specs/release/, without .yaml "
                               "(builder list)")
        sub[name].add_argument("overrides", nargs="*", default=[], metavar="OVERRIDE",
                               help="Hydra override, e.g. quant=bf16 context.max_model_len=4096")
        sub[name].add_argument("--json", action="store_true", help="machine-readable output")
    sub["list"].add_argument("--json", action="store_true", help="machine-readable output")
    sub["list"].add_argument("--names", action="store_true", help="release names only, one a line (for scripts)")
    sub["lock"].add_argument("--check", action="store_true", help="exit 1 if locks/ or params.yaml are stale")
    sub["plan"].add_argument("--base", metavar="GIT_REV", help="revision to compare with "
                             "(default: the merge base of HEAD with main)")
    sub["plan"].add_argument("--json", action="store_true", help="machine-readable output")
    sub["import"].add_argument("model", metavar="MODEL", help="a file name in specs/model/, without .yaml")
    add = sub["model"].add_subparsers(dest="model_verb", required=True, metavar="add").add_parser(
        "add", help="check a checkpoint folder and write specs/model/NAME.yaml",
        description="Check a local checkpoint folder (an HF snapshot or save_pretrained output) as a build "
                    "will, copy it into weights/NAME/ unless it is inside the repository, and write "
                    "specs/model/NAME.yaml with its digest and architecture.")
    add.add_argument("name", metavar="NAME", help="the model's name in specs/model/ (lower case, digits, . _ -)")
    add.add_argument("path", type=Path, metavar="PATH",
                     help="the checkpoint folder (config.json, *.safetensors, tokenizer)")
    add.add_argument("--id", help="Hugging Face id for the card (default: from the snapshot path, else NAME)")
    add.add_argument("--license", help="license id for the card (default: the folder's README.md, else other)")
    add.add_argument("--force", action="store_true", help="replace an existing specs/model/NAME.yaml")
    sub["build"].add_argument("--out", type=Path, metavar="DIR", help="output folder (default artifacts/<release>, or "
                              "artifacts/<release>-<12 hex of the artifact_id> with overrides)")
    sub["build"].add_argument("--force", action="store_true", help="rebuild even if up to date")
    sub["build-many"].add_argument("releases", nargs="*", metavar="RELEASE")
    sub["build-many"].add_argument("--stale", action="store_true", help="build the releases whose build@ stage "
                                   "`dvc status` reports changed, then record them in dvc.lock as `dvc repro` would")
    sub["build-many"].add_argument("--launcher", choices=("local", "slurm"), default="local",
                                   help="local processes (default) or SLURM jobs")
    sub["build-many"].add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                                   type=key_value, help="submitit SLURM parameter without its slurm_ "
                                   "prefix, e.g. partition=cpu, array_parallelism=8, cpus_per_task=4, mem_gb=32 "
                                   "(repeatable; CPUs and memory default to the release's estimate)")
    sub["build-many"].add_argument("--force", action="store_true", help="rebuild even if up to date")
    for name in ("verify", "audit", "sign"):
        sub[name].add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
        sub[name].add_argument("--signature", type=Path, metavar="SIG",
                               help="signature file (default: <artifact>.sig beside it)")
    sub["verify"].add_argument("--rebuild", action="store_true", help="rebuild from the recorded inputs and compare")
    sub["verify"].add_argument("--key", type=Path, metavar="PUBLIC.pem",
                               help="the signer's P-256 public key (PEM); checks the signature")
    sub["audit"].add_argument("--key", type=Path, metavar="PUBLIC.pem",
                              help="the signer's P-256 public key (PEM); checks the signature")
    sub["audit"].add_argument("--json", action="store_true", help="machine-readable output")
    sub["sign"].add_argument("--key", type=Path, required=True, metavar="PRIVATE.pem",
                             help="P-256 private key (PEM, unencrypted)")
    sub["build"].add_argument("--calibration-stats", type=Path, metavar="FILE",
                              help="also write calibration maxima per layer to FILE (JSON, outside the artifact)")
    for name in ("eval", "summary"):
        sub[name].add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    sub["eval"].add_argument("--eval", metavar="OPTION", help="an eval group option (specs/eval/OPTION.yaml) "
                             "instead of the release's own")
    sub["eval"].add_argument("--out", type=Path, metavar="FILE", help="write eval JSON here instead of to stdout")
    sub["summary"].add_argument("--details", action="store_true", help="per-layer table with scale statistics")
    sub["summary"].add_argument("--json", action="store_true", help="machine-readable output")
    sub["report"].add_argument("releases", nargs="*", metavar="RELEASE", help="releases to show (default: all)")
    sub["report"].add_argument("--out", type=Path, metavar="DIR", help="output folder (default reports/, git-ignored)")
    top.verbs = sub
    return top


def main(argv=None) -> int:
    determinism.apply_environment()  # before anything imports torch
    console.quiet_library_bars()  # before anything imports tqdm
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit: an OSError, not a crash
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `builder`: what it can do, not "required: VERB"
        parser().print_help(sys.stderr)
        return 2
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if unknown:  # shown with the verb's own help, not the top level's
        top.verbs[args.verb].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return VERBS[args.verb][0](args)
    except BuilderError as error:
        print(f"builder {args.verb}: error: {error.render()}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # disk full, permissions, vanished files: say which, and stop
        where = f" ({error.filename})" if error.filename else ""
        print(f"builder {args.verb}: error: I/O error{where}: {error.strerror or error}; "
              "nothing was left half-written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"builder {args.verb}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:  # e.g. `python` outside the environment the README installs
        print(console.missing_package(args.verb, error), file=sys.stderr)
        return 2
    except Exception as error:  # a bug in the builder, not in the input: one line, the traceback in a file
        print(f"builder {args.verb}: internal error: {type(error).__name__}: {error}\n"
              f"  this is a bug in the builder; the traceback is in {console.crash_report(argv)} "
              "(please attach it to a report)", file=sys.stderr)
        return 1
