"""The `remem` command line. Bad input: one line on stderr naming the field, exit code 2."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remem_ray.errors import NotReadyError, TrainingDivergedError, UserInputError

EXIT_USAGE = 2
VERBOSE_HELP = "show all of Ray's and Tune's console output (sweep.log keeps it either way)"


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "name", None) is not None:
        overrides["name"] = args.name
    if getattr(args, "storage", None) is not None:
        overrides["storage.root"] = args.storage
    if getattr(args, "endpoint", None) is not None:
        overrides["storage.endpoint"] = args.endpoint
    if getattr(args, "teacher_epoch", None) is not None:
        if getattr(args, "teacher", None) is not None:  # a checkpoint folder is one epoch's already
            raise UserInputError("--teacher-epoch: give it or --teacher (a checkpoint of one epoch), not both")
        overrides["student.teacher_epoch"] = args.teacher_epoch
    if getattr(args, "teacher", None) is not None:
        overrides["student.teacher_checkpoint"] = args.teacher
    return overrides


def _load(args: argparse.Namespace, weights_of: tuple[str, ...]):
    """The validated run spec, its storage proven usable before anything is written; weights_of:
    the roles whose weights the verb loads."""
    from remem_ray.config import load_run_spec
    from remem_ray.spec_checks import check_spec
    from remem_ray.storage import preflight_config

    spec = load_run_spec(args.spec, _run_overrides(args))
    check_spec(spec, weights_of=weights_of)
    preflight_config(spec.storage)
    return spec


def cmd_teacher(args: argparse.Namespace) -> int:
    from remem_ray.runs import run_teacher

    result = run_teacher(_load(args, ("teacher",)), checked=True)
    for epoch, location in result["checkpoints"].items():
        val = next(h["val_acc"] for h in result["history"] if h["epoch"] == epoch)
        print(f"teacher epoch {epoch}: val_acc {val:.4f}  {location}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from remem_ray.runs import run_student

    _print_student(run_student(_load(args, ("student",)), checked=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from remem_ray.runs import run_student, run_teacher

    spec = _load(args, ("teacher", "student"))
    if spec.student.teacher_checkpoint is not None:  # it trained a whole teacher, then distilled from another
        raise UserInputError(
            "student.teacher_checkpoint: `remem run` distils from the teacher it trains; "
            "`remem distill` distils from a saved one"
        )
    teacher = run_teacher(spec, checked=True)
    epoch = spec.student.teacher_epoch or spec.teacher.saved_epochs[-1]  # what the student distils from
    chosen = next(h for h in teacher["history"] if h["epoch"] == epoch)
    print(f"teacher epoch {epoch} (the student's): val_acc {chosen['val_acc']:.4f}  test_acc {chosen['test_acc']:.4f}")
    _print_student(run_student(spec, checked=True))
    return 0


def _print_student(result: dict[str, Any]) -> None:
    best = result["best"]
    print(
        f"student: best val_acc {best['val_acc']:.4f} (epoch {best['epoch']}), "
        f"test_acc there {best['test_acc']:.4f}  {result['checkpoint']}"
    )


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from remem_ray.config import load_sweep_spec
    from remem_ray.sweep import run_sweep

    spec = load_sweep_spec(args.spec, _run_overrides(args))
    summary = run_sweep(spec, address=args.address, verbose=args.verbose)
    return _print_end(summary, spec.storage.endpoint)


EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def _print_end(summary, endpoint: str | None = None) -> int:
    """The table and where the files are; exit code 130 when the sweep was interrupted (Ctrl-C:
    Tune saves its state and returns), 1 when a trial failed (the sweep did less than it was
    asked: a script's `remem sweep run ... && deploy` must not go on), else 0."""
    from remem_ray.sweep import format_table
    from remem_ray.sweep.driver import resume_command

    print(format_table(summary))
    print(f"summary: {summary.experiment}/summary.json")
    print(f"report: {summary.experiment}/report.md")
    failed = [row.trial_id for row in summary.trials if row.state == "ERROR"]
    again = resume_command(summary.experiment, endpoint)
    if summary.interrupted:
        print(
            f"remem: interrupted: {summary.unfinished} trial{'s' if summary.unfinished != 1 else ''} not run "
            f"to the end{f', {len(failed)} failed' if failed else ''}; `{again}` continues the sweep "
            f"(finished trials are kept)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not failed:
        return 0
    diverged = sum(1 for row in summary.trials if (row.failure or "").startswith("TrainingDivergedError"))
    print(
        f"remem: error: {len(failed)} of {len(summary.trials)} trials failed ({', '.join(failed[:5])}"
        f"{', ...' if len(failed) > 5 else ''}); each one's error is in its trial folder under "
        f"{summary.experiment}; `{again}` runs them again"
        + (
            f" ({diverged} of them diverged, a teacher or a student: refused at once until the diverged.json "
            f"their error names is removed)"
            if diverged
            else ""
        ),
        file=sys.stderr,
    )
    return 1


def _located(args: argparse.Namespace):
    from remem_ray.sweep import locate_sweep

    return locate_sweep(args.sweep, storage_root=args.storage, endpoint=args.endpoint)


def cmd_sweep_resume(args: argparse.Namespace) -> int:
    from remem_ray.sweep import resume_sweep

    if (args.address or os.environ.get("RAY_ADDRESS") or "").startswith(("http://", "https://")):
        args.address = args.address or os.environ["RAY_ADDRESS"]  # Ray's docs export the dashboard so
        return _submit_resume(args)
    spec = _located(args)
    summary = resume_sweep(spec, address=args.address, verbose=args.verbose)
    return _print_end(summary, spec.storage.endpoint)


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from remem_ray.sweep import format_table, sweep_summary

    print(format_table(sweep_summary(_located(args))))
    return 0


def cmd_sweep_dashboard(args: argparse.Namespace) -> int:
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.study import serve_dashboard

    if not 1 <= args.port <= 65535:
        raise UserInputError(f"--port: {args.port} is not a port number (1-65535)")
    spec = _located(args)
    try:
        serve_dashboard(spec, SweepLayout.of(spec), args.port)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_sweep_best(args: argparse.Namespace) -> int:
    import json

    from remem_ray.sweep import sweep_summary
    from remem_ray.sweep.results import no_student_yet

    summary = sweep_summary(_located(args))
    best = summary.best
    if best is None:
        raise NotReadyError(no_student_yet(summary))
    print(
        json.dumps(
            {
                "trial_id": best.trial_id,
                "params": best.params,
                "student_val_acc": best.student_val_acc,
                "student_test_acc": best.student_test_acc,
                "teacher_val_acc": best.teacher_val_acc,
                "stopped_early": best.stopped_early,  # its score at the epoch the scheduler stopped it
                "epochs_done": best.epochs_done,
                "student_checkpoint": best.student_checkpoint,
            },
            indent=2,
        )
    )
    return 0


def _submit_resume(args: argparse.Namespace) -> int:
    """`sweep resume --address http://HEAD:8265`: the resume runs on the cluster as a job, as the
    sweep's `submit` did (a resume here would drive the cluster's sweep from this machine's Ray)."""
    from remem_ray.config import ENDPOINT_URL, ENDPOINT_URL_RULE
    from remem_ray.sweep.jobs import check_address, submit_resume

    check_address(args.address)
    if args.endpoint is not None and not re.fullmatch(ENDPOINT_URL, args.endpoint):
        # it travels in the job's command line, which the dashboard and `ray job list` show
        raise UserInputError(f"--endpoint: {ENDPOINT_URL_RULE}")
    sweep = args.sweep
    if "/" not in sweep:  # a name: under --storage, as the cluster reaches it
        if not args.storage or not _cluster_sees(args.storage):
            raise UserInputError(
                "NAME|URI: a sweep resumed on a cluster is named by its folder's URI as the cluster reaches it "
                "(s3://bucket/prefix/sweeps/NAME), or by its name with --storage s3://bucket/prefix"
            )
        sweep = f"{args.storage.rstrip('/')}/sweeps/{sweep}"
    elif not _cluster_sees(sweep):
        raise UserInputError(f"NAME|URI: {sweep} is a relative path: the cluster's job runs in another folder")
    job_id = submit_resume(sweep, args.address, endpoint=args.endpoint, ship_package=args.ship_package)
    print(job_id)
    print(f"follow it with: remem sweep logs {job_id} --address {args.address} --follow", file=sys.stderr)
    return 0


def _cluster_sees(location: str) -> bool:
    """Whether a job on a cluster can reach `location` as written: an s3:// URI, or an absolute
    path (which every node must see: a shared file system). Not `~/...`: this machine's home
    once read here, the cluster's there."""
    return location.startswith("s3://") or Path(location).is_absolute()


def _written_root(args: argparse.Namespace) -> str | None:
    """The storage root as the user wrote it (--storage, else the spec's), before it is made
    absolute on this machine; None where neither names one (the default ./remem-results)."""
    import yaml

    if args.storage:
        return args.storage
    raw = yaml.safe_load(Path(args.spec).read_text()) or {}
    storage = raw.get("storage") if isinstance(raw, dict) else None
    return storage.get("root") if isinstance(storage, dict) else None


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    from remem_ray.config import load_sweep_spec
    from remem_ray.spec_checks import check_spec
    from remem_ray.sweep.jobs import check_address, submit_sweep

    check_address(args.address)
    spec = load_sweep_spec(args.spec, _run_overrides(args))
    written = _written_root(args)
    if written is None or not _cluster_sees(written):
        # made absolute here, it named a folder of this machine (the default ./remem-results):
        # on the cluster each node wrote its own, and the spot nodes' went with them
        raise UserInputError(
            f"storage.root: {written or 'the default ./remem-results'} is a folder of this machine; a submitted "
            f"sweep runs on the cluster: set s3://bucket/prefix (--storage), or an absolute path every node sees"
        )
    check_spec(spec, inputs_here=False)  # weights files and data folders are read on the cluster
    # No storage preflight here: the job reaches storage from the cluster, with its network
    # and instance role, not this machine's; `sweep run` on the cluster checks it first thing.
    job_id = submit_sweep(spec, args.address, ship_package=args.ship_package)
    print(job_id)
    if not spec.storage.root.startswith("s3://"):
        print(
            f"remem: note: storage root {spec.storage.root} is a local path: on a multi-node "
            f"cluster every node must see it (a shared file system); use s3:// there",
            file=sys.stderr,
        )
    print(f"follow it with: remem sweep logs {job_id} --address {args.address} --follow", file=sys.stderr)
    return 0


def cmd_sweep_logs(args: argparse.Namespace) -> int:
    from remem_ray.sweep.jobs import job_logs

    status = job_logs(args.address, args.job, follow=args.follow)
    print(f"job {args.job}: {status}", file=sys.stderr)
    return 1 if status in ("FAILED", "STOPPED") else 0  # `logs --follow && next-step` must not go on


def cmd_sweep_stop(args: argparse.Namespace) -> int:
    from remem_ray.sweep.jobs import STOP_WAIT_S, TERMINAL, stop_job

    status, graceful = stop_job(args.address, args.job)
    print(f"job {args.job}: {status}")
    if status in TERMINAL:
        return 0
    if graceful:
        print(
            f"stopping as Ctrl-C would: the sweep saves its state and ends its trials (killed after {STOP_WAIT_S} s); "
            f"`remem sweep logs {args.job} --address {args.address} --follow` shows its end, "
            f"`remem sweep resume URI --address {args.address}` continues it",
            file=sys.stderr,
        )
    else:
        print(
            "remem: note: this job was not made by `remem sweep submit` (nor given RAY_JOB_STOP_SIGNAL=SIGINT): "
            "Ray ends it with SIGTERM, then SIGKILL 3 s later, before the sweep can save; "
            "`remem sweep resume` continues it from its last save",
            file=sys.stderr,
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from remem_ray.sweep import sweep_summary
    from remem_ray.sweep.driver_lease import live_driver
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.report import report_folder, write_report

    spec = _located(args)
    layout = SweepLayout.of(spec)

    def alive(layout: SweepLayout) -> str | None:
        return live_driver(layout, spec.sweep.lease_stale_after_s, note=lambda line: print(line, file=sys.stderr))

    folder, interim = report_folder(layout, alive)
    if interim is not None:
        print(interim, file=sys.stderr)
    paths = write_report(sweep_summary(spec), layout, folder)
    for uri in paths.values():
        print(uri)
    return 0


def cmd_sweep_export(args: argparse.Namespace) -> int:
    from remem_ray.sweep.export import export_trial

    _print_export(export_trial(_located(args), args.trial, args.to, onnx=args.onnx))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from remem_ray.checkpoint_files import split_location
    from remem_ray.export import export_student
    from remem_ray.storage import preflight

    preflight(args.checkpoint, args.endpoint, root_field="CHECKPOINT", endpoint_field="--endpoint", writable=False)
    source, rel = split_location(args.checkpoint, args.endpoint)
    _print_export(export_student(source, rel, args.to, onnx=args.onnx, endpoint=args.endpoint))
    return 0


def _print_export(exported) -> None:
    print(f"exported to {exported.target}: {', '.join(exported.files)}")
    if exported.onnx_max_diff is not None:
        print(f"ONNX logits match PyTorch's within {exported.onnx_max_diff:.1e} on a check batch")
    from remem_ray.export import local_dir_of

    copy = " once copied to a local folder" if exported.target.startswith("s3://") else ""
    print(f'load it{copy}: timm.create_model("local-dir:{local_dir_of(exported.target)}", pretrained=True)')


def _add_checkpoint_args(p) -> None:
    """A checkpoint folder to read, local or on S3 (`export`, `info`)."""
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder (path or s3:// URI)")
    p.add_argument("--endpoint", help="S3-compatible endpoint for s3:// URIs")


def _add_export_args(p) -> None:
    p.add_argument("--to", required=True, metavar="DIR", help="an empty or new folder, or s3:// URI")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxruntime)")


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from remem_ray.config import load_run_spec
    from remem_ray.info import checkpoint_info
    from remem_ray.spec_checks import check_data
    from remem_ray.train.common import pick_device

    spec = load_run_spec(args.data)
    check_data(spec)
    device = pick_device(spec.device)
    info = checkpoint_info(args.checkpoint, spec, device, samples=args.samples, endpoint=args.endpoint)
    print(json.dumps(info, indent=2))
    return 0


def _add_ship_package(parser) -> None:
    parser.add_argument(
        "--ship-package",
        action="store_true",
        help="upload this checkout's remem_ray package with the job (else the cluster's install)",
    )


def _add_job_verbs(sub) -> None:
    submit = sub.add_parser(
        "submit",
        help="submit a sweep to a Ray cluster (Ray Jobs API); prints the job id",
        description="submit a sweep to a Ray cluster through the Ray Jobs API",
    )
    submit.add_argument("spec", metavar="SPEC.yaml")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
    submit.add_argument("--name", help="sweep name (default: the spec's name)")
    submit.add_argument("--storage", help="storage root (use s3://bucket/prefix on multi-node clusters)")
    submit.add_argument("--endpoint", help="S3-compatible endpoint for an s3:// storage root")
    _add_ship_package(submit)
    submit.set_defaults(handler=cmd_sweep_submit)
    for verb, handler, text in (
        ("logs", cmd_sweep_logs, "print a submitted sweep's logs"),
        ("stop", cmd_sweep_stop, "stop a submitted sweep"),
    ):
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("job", metavar="JOB", help="the job id `remem sweep submit` printed")
        p.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
        if verb == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.set_defaults(handler=handler)


def _add_sweep_verbs(verbs) -> None:
    sweep = verbs.add_parser(
        "sweep",
        help="search rho, alpha and the teacher checkpoint with Ray Tune",
        description="Sweeps over the teacher's fine-tuning, scored by the distilled student.",
    )
    sub = sweep.add_subparsers(dest="sweep_verb", metavar="SWEEP_VERB")
    sub.required = True
    run = sub.add_parser("run", help="start a sweep from a spec", description="start a sweep from a spec")
    run.add_argument("spec", metavar="SPEC.yaml")
    run.add_argument("--name", help="sweep name (default: the spec's name)")
    run.add_argument("--storage", help="storage root: a folder or s3://bucket/prefix")
    run.add_argument("--endpoint", help="S3-compatible endpoint for an s3:// storage root")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(handler=cmd_sweep_run)
    for verb, handler, text in (
        ("resume", cmd_sweep_resume, "continue an interrupted sweep (finished trials are kept)"),
        ("status", cmd_sweep_status, "the trial table of a sweep"),
        ("best", cmd_sweep_best, "the best trial's parameters and student checkpoint"),
        ("dashboard", cmd_sweep_dashboard, "serve the sweep's Optuna study with optuna-dashboard on 127.0.0.1"),
        ("export", cmd_sweep_export, "write a trial's student (default: the best) as a timm model folder"),
    ):
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("sweep", metavar="NAME|URI", help="sweep name under --storage, or the sweep folder's path/URI")
        p.add_argument("--storage", help="storage root the NAME lives under (default ./remem-results)")
        p.add_argument(
            "--endpoint", help="S3-compatible endpoint for s3:// URIs (or AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)"
        )
        if verb == "resume":
            p.add_argument(
                "--address",
                help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1); a dashboard's "
                "http://HEAD:8265 submits the resume as a job there (print its id, as `sweep submit` does)",
            )
            p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
            _add_ship_package(p)
        if verb == "dashboard":
            p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
        if verb == "export":
            p.add_argument("--trial", metavar="ID", help="the trial whose student to export (default: the best)")
            _add_export_args(p)
        p.set_defaults(handler=handler)
    _add_job_verbs(sub)


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end as every bad input does: one line naming the argument, exit 2 (argparse
    printed its usage first, two or three lines more); `--help` shows the usage. No abbreviated
    flags: `remem run --teacher 5` was taken as --teacher-epoch 5."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # the verbs' parsers are made by add_parser: this class
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"remem: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def parse_args(self, args=None, namespace=None):
        """An unknown flag is named by the verb that got it, with the flag it most looks like
        (argparse named `remem --help` for a typo in `remem sweep run --nme`)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = self._verb_parser(parsed)
            flags = [f for action in verb._actions for f in action.option_strings if f.startswith("--")]
            close = difflib.get_close_matches(extras[0].split("=", 1)[0], flags, n=1)
            like = f"; did you mean {close[0]}?" if close else ""
            verb.error(f"unrecognized arguments: {' '.join(extras)}{like}")
        return parsed

    def _verb_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest parser the arguments reached (`remem sweep run`'s for `sweep run ...`)."""
        parser: argparse.ArgumentParser = self
        while True:
            subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = getattr(parsed, subparsers[0].dest, None) if subparsers else None
            if chosen is None:
                return parser
            parser = subparsers[0].choices[chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="remem",
        description="ReMem on Ray: fine-tune a ViT teacher with SAM and MLP reweighting, distil a student.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="after a one-line error, show the tracebacks behind it (or set REMEM_DEBUG=1)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    def run_verb(name: str, help_text: str, handler, with_teacher: str | None) -> None:
        """with_teacher: which teacher the student distils from: "saved" (any, --teacher) or "own"."""
        p = verbs.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "spec",
            nargs="?",
            default=None,
            metavar="SPEC.yaml",
            help="run spec (YAML); omitted: the embedded default (digits)",
        )
        p.add_argument("--name", help="run name (folder under <storage>/runs/)")
        p.add_argument("--storage", help="storage root: a folder or s3://bucket/prefix")
        if with_teacher == "saved":
            p.add_argument("--teacher", help="teacher checkpoint folder (path or s3:// URI)")
        if with_teacher:
            p.add_argument("--teacher-epoch", type=int, help="which saved teacher epoch to distil from")
        p.set_defaults(handler=handler)

    run_verb("teacher", "fine-tune the teacher (SAM + MLP reweighting) and save its checkpoints", cmd_teacher, None)
    run_verb("distill", "distil the student from a saved teacher checkpoint", cmd_distill, "saved")
    run_verb("run", "teacher then student, one run", cmd_run, "own")
    _add_sweep_verbs(verbs)
    report = verbs.add_parser(
        "report",
        help="write a sweep's report.md and plots into its folder",
        description="write a sweep's report.md and PNG plots into its folder",
    )
    report.add_argument("sweep", metavar="NAME|URI")
    report.add_argument("--storage", help="storage root the NAME lives under (default ./remem-results)")
    report.add_argument("--endpoint", help="S3-compatible endpoint for s3:// URIs")
    report.set_defaults(handler=cmd_report)
    export = verbs.add_parser(
        "export",
        help="write a student checkpoint (`remem run`'s) as a timm model folder",
        description="write a student checkpoint folder as a timm model folder (config.json, "
        "model.safetensors, a model card), loadable with timm alone",
    )
    _add_checkpoint_args(export)
    _add_export_args(export)
    export.set_defaults(handler=cmd_export)
    info = verbs.add_parser(
        "info",
        help="a checkpoint's mutual information and MLP expertness",
        description="mutual information of a checkpoint's outputs and per-block "
        "expertness of its MLPs, on the val split of --data",
    )
    _add_checkpoint_args(info)
    info.add_argument("--data", required=True, metavar="SPEC.yaml", help="spec whose data section to use")
    info.add_argument("--samples", type=int, default=1000, help="val images to use (default 1000)")
    info.set_defaults(handler=cmd_info)
    return parser


def print_cause_chain(err: BaseException) -> None:
    """The traceback of an error and of every error behind it, even those hidden by `from None`
    (the one-line messages keep tracebacks out of users' way; --debug brings them back)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.print_exception(type(current), current, current.__traceback__, chain=False, file=sys.stderr)
        current = current.__cause__ or current.__context__
        if current is not None:
            print("\nbehind it:", file=sys.stderr)


# a value of these given empty (an unset shell variable, `--storage "$ROOT"`) would be read as
# "not given" and silently fall back to a default: refused instead
_NON_EMPTY = {
    "name": "--name",
    "storage": "--storage",
    "endpoint": "--endpoint",
    "address": "--address",
    "teacher": "--teacher",
    "to": "--to",
    "trial": "--trial",
    "data": "--data",
    "spec": "SPEC.yaml",
    "sweep": "NAME|URI",
    "checkpoint": "CHECKPOINT",
    "job": "JOB",
}


def _refuse_empty_values(args: argparse.Namespace) -> None:
    for dest, flag in _NON_EMPTY.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise UserInputError(f"{flag}: empty value")
    samples = getattr(args, "samples", None)
    if samples is not None and samples < 2:
        raise UserInputError(f"--samples: need at least 2 val images, got {samples}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _refuse_empty_values(args)
        return args.handler(args)
    except UserInputError as err:
        print(f"remem: error: {err}", file=sys.stderr)
        if args.debug or os.environ.get("REMEM_DEBUG") == "1":
            print_cause_chain(err)
        return EXIT_USAGE
    except (TrainingDivergedError, NotReadyError) as err:  # not bad input: the run failed, or is not there yet
        print(f"remem: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("remem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
