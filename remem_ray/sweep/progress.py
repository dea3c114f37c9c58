"""The sweep driver's console and log file.

By default the console shows the epoch lines the workers mark (see remem_ray.console; which
epochs: remem_ray.train.session.EpochLines), a line when a trial starts and ends, a compact
progress line at a steady cadence, and one line per worker traceback or failed trial; Ray's and
Tune's own chatter, and the tracebacks, go only to the log file, `<sweep folder>/sweep.log`,
which holds everything. `--verbose` puts Ray's console back.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from remem_ray.console import marked
from remem_ray.contract import EPOCH, METRIC, STUDENT_REPLAYED, TEACHER_TRAINED, best_trial, stopped_early
from remem_ray.search_params import SEARCH_PARAMS
from remem_ray.storage import Storage
from remem_ray.sweep.layout import LOG_FILE
from remem_ray.sweep.ray_adapter import driver_notices_to, kept_lines, worker_output_to

PROGRESS_EVERY_S = 30.0
# a line of a trial's process: "trial 1d233b08 student: epoch 1/8 ...", "trial 1d233b08: training teacher ..."
_TRIAL_LINE = re.compile(r"trial ([0-9a-f]{8}(?:_\d+)?)[ :]")
# The raylet's warning that a node started 4x as many worker processes as it has CPUs: every trial
# driver, Train controller and worker is a process here, so a sweep on a small node meets it by
# design. The log keeps it; other notices (tasks killed for memory...) reach the console.
WORKER_POOL_SIZE_NOTICE = "worker processes have been started on node"


class SweepLog:
    """Append-only text log of the sweep; an s3:// sweep folder gets a copy at each sync()."""

    def __init__(self, experiment: Storage, may_write: Callable[[], bool] = lambda: True) -> None:
        """may_write: whether this driver still drives the sweep (its driver lease); an s3:// log is
        copied up only then, never over the log of a driver that took the sweep over."""
        self.experiment = experiment
        self.may_write = may_write
        self.remote = experiment.uri().startswith("s3://")
        self._closed = False
        if self.remote:
            # a resumed sweep goes on with its log (read first: a failed read leaves no folder)
            earlier = experiment.read_bytes(LOG_FILE) if experiment.is_file(LOG_FILE) else None
            self.path = Path(tempfile.mkdtemp(prefix="remem-log-")) / LOG_FILE
            if earlier is not None:
                self.path.write_bytes(earlier)
        else:
            self.path = Path(experiment.path(LOG_FILE))
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            if self._closed:  # a line in flight from another thread as the sweep ends
                return
            self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")
            self._file.flush()

    def sync(self) -> None:
        if self.remote and self.may_write():
            self._upload()

    def _upload(self) -> None:
        with self._lock:
            data = self.path.read_bytes()
        self.experiment.write_bytes(LOG_FILE, data)

    def close(self) -> None:
        with self._lock:  # first: no line lands after the copy is taken
            self._closed = True
            self._file.close()
        copied = self.may_write()  # asked once: a loss between two asks left no copy, yet removed this one
        if not copied and self.remote:
            print(
                f"remem: this driver's sweep log stays in {self.path}: another driver runs the sweep now",
                file=sys.stderr,
            )
        try:
            if copied and self.remote:
                self._upload()
        except Exception as exc:  # noqa: BLE001 (the sweep's own outcome matters more than its log's copy)
            copied = False
            print(
                f"remem: warning: could not copy the sweep log to {self.experiment.uri(LOG_FILE)} "
                f"(it stays in {self.path}): {exc}",
                file=sys.stderr,
            )
        if self.remote and copied:  # the bucket has it
            shutil.rmtree(self.path.parent, ignore_errors=True)


class LogFileHandler(logging.Handler):
    """Python logging records (Ray, Tune, Optuna on the driver) into the sweep log."""

    def __init__(self, log: SweepLog) -> None:
        super().__init__(logging.INFO)
        self.log = log
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(self.format(record))
        except Exception:  # noqa: BLE001 (logging must never break the sweep)
            self.handleError(record)


class SweepConsole:
    def __init__(
        self,
        log: SweepLog,
        verbose: bool = False,
        out: TextIO | None = None,
        on_tick: Callable[[], object] | None = None,
    ) -> None:
        self.log, self.verbose = log, verbose
        self.out = out or sys.stdout
        self.started = time.monotonic()
        self.on_tick = on_tick  # e.g. the Optuna study's export, at each progress line
        self._trial_of: dict[tuple[Any, ...], str] = {}  # (node ip, pid, actor) -> the trial its lines named

    def tick(self) -> None:
        """Bring the copies others read up to date (the study's, an s3:// log's); a failure, such
        as a storage outage the sweep itself rides out, is logged and never stops the sweep."""
        if not self.log.may_write():  # another driver runs the sweep now: its copies are its own
            return
        for update in (self.on_tick, self.log.sync):
            try:
                if update is not None:
                    update()
            except Exception as exc:  # noqa: BLE001 (a copy for readers must not stop the sweep)
                self.log.write(f"could not update the sweep's copies: {type(exc).__name__}: {exc}")

    def show(self, message: str) -> None:
        """A line on the console and in the log."""
        self.log.write(message)
        self._print(message)

    def _print(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=self.out, flush=True)

    def worker_output(self, batch: dict[str, Any]) -> None:
        """A batch of output lines from a process of the cluster (see sweep/ray_adapter.py)."""
        lines = kept_lines(batch)
        # named as well: a process of another kind that gets a finished worker's pid is not its trial's
        process = (batch.get("ip"), batch.get("pid"), batch.get("actor_name"))
        who = f"({batch.get('actor_name') or batch.get('task_name') or 'worker'} pid={batch.get('pid')})"
        for line in lines:
            self.log.write(f"{who} {line}")
            named = _TRIAL_LINE.match(marked(line) or line)
            if named:  # a trial's driver or Train worker: its lines start with the trial's name
                self._trial_of[process] = named[1]
        if process in self._trial_of:  # Ray's batches name the process only
            who = f"trial {self._trial_of[process]} {who}"
        if self.verbose:
            return  # Ray's own printer shows them
        traceback = batch.get("is_err") and any(line.startswith("Traceback") for line in lines)
        # Train's decision on a failed run: a worker that died gives no traceback, on either stream
        if traceback or any(_TRAIN_DECISION.search(line) for line in lines):
            self._print(f"{who} {traceback_line(lines)}")  # the whole of it is in the log
            return
        for line in lines:
            message = marked(line)
            if message is not None:
                self._print(message)

    def driver_notice(self, batch: dict[str, Any]) -> None:
        """A notice the cluster pushed to this driver (see sweep/ray_adapter.py)."""
        for line in batch.get("lines") or []:
            self.log.write(f"(raylet) {line}")
            if WORKER_POOL_SIZE_NOTICE not in line:
                print(f"(raylet) {line}", file=self.out, flush=True)

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return (
            f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
            if seconds >= 3600
            else (f"{seconds // 60}m{seconds % 60:02d}s")
        )


def progress_line(trials: list, num_samples: int, elapsed: str) -> str:
    """trials done / running / pending, teachers trained / reused, best student so far."""
    status = [t.status for t in trials]
    results = [t.last_result or {} for t in trials]
    done = status.count("TERMINATED")
    stopped = sum(1 for t, r in zip(trials, results) if t.status == "TERMINATED" and stopped_early(r))
    errored = status.count("ERROR")
    pending = status.count("PENDING") + status.count("PAUSED") + max(0, num_samples - len(trials))
    replayed = sum(1 for r in results if r.get(STUDENT_REPLAYED))
    reported = [r for r in results if TEACHER_TRAINED in r and not r.get(STUDENT_REPLAYED)]
    trained = sum(int(r[TEACHER_TRAINED]) for r in reported)
    students = f" | students {replayed} replayed" if replayed else ""
    best_id = best_trial(((t.trial_id, t.status, r) for t, r in zip(trials, results)), live=True)
    top = next((r for t, r in zip(trials, results) if t.trial_id == best_id), None)
    best = f"best student val {top[METRIC]:.4f} (trial {best_id})" if top else "no student yet"
    return (
        f"progress {elapsed}: trials {done}/{num_samples} done ({stopped} stopped early), {errored} failed, "
        f"{status.count('RUNNING')} running, {pending} pending | teachers {trained} trained, "
        f"{len(reported) - trained} reused{students} | {best}"
    )


def _params(config: dict[str, Any]) -> str:
    return ", ".join(f"{name} {config[name]:g}" for name in SEARCH_PARAMS if name in config)


_active: SweepConsole | None = None  # the console of the sweep this driver runs now


class ProgressCallback(Callback):
    """Trial start and end lines, and the progress line every `every_s` and at the end.

    Tune pickles its callbacks with the experiment (tuner.pkl) and uses those on resume, so
    this holds only plain numbers and finds the live console through `sweep_console`.
    """

    def __init__(self, num_samples: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.num_samples, self.every_s = num_samples, every_s
        self.last = time.monotonic()

    def __getstate__(self) -> dict:
        return {"num_samples": self.num_samples, "every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.num_samples, self.every_s = state["num_samples"], state["every_s"]
        self.last = time.monotonic()  # a monotonic clock means nothing in another process

    def on_trial_start(self, iteration, trials, trial, **info):
        if _active:
            _active.show(f"trial {trial.trial_id} started: {_params(trial.config)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _active:
            result = trial.last_result or {}
            how = f"stopped early after student epoch {result.get(EPOCH)}" if stopped_early(result) else "done"
            acc = f"best student val {result[METRIC]:.4f}" if METRIC in result else "no student result"
            _active.show(f"trial {trial.trial_id} {how}: {acc}")

    def on_trial_error(self, iteration, trials, trial, **info):
        if _active:
            where = trial.path or "its trial folder"
            _active.show(f"trial {trial.trial_id} failed: {_failure(trial)} (the whole error: error.txt in {where})")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if _active:
            _active.show(
                f"trial {trial.trial_id} failed, Tune runs it again (failure {trial.num_failures}): {_failure(trial)}"
            )

    def on_step_end(self, iteration, trials, **info):
        if _active and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            _active.show(progress_line(trials, self.num_samples, _active.elapsed()))
            _active.tick()

    # No line at the experiment's end: after Ctrl-C Tune ends the interrupted trials as TERMINATED
    # in memory (stored: PENDING, to run again), so a line from these objects read "2/2 done
    # (2 stopped early)"; the driver prints the last line from the stored state (`final_progress`).


def _failure(trial) -> str:
    """One line for a trial's newest failure, from the error file Tune has just written."""
    try:
        text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
    except OSError:
        text = ""
    return failure_line(text) or "see its error file"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "pkg.module.SomeError: message", "SomeError(Cause): message", "KeyboardInterrupt"
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:Error|Exception|Exit|Interrupt|Timeout)\w*)(\(\w+\))?(?::\s*(.*))?$"
)
_SNIPPET_HEADERS = ("[Rank ", "Traceback (most recent call last)")


def failure_line(error_text: str, limit: int = 240) -> str | None:
    """The exception of the newest failure in a Tune error file (`Failure # n ...` blocks), as one
    line: the last exception line of its traceback (a Train worker's own, where it raised), and,
    when that message ends in a colon, the line that completes it (a dead worker's reason)."""
    newest = _ANSI.sub("", error_text).rsplit("Failure # ", 1)[-1]
    lines = [line.strip() for line in newest.splitlines()]
    found = None
    for i, line in enumerate(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            found = (i, f"{match[1]}: {match[3]}" if match[3] else match[1])
    if found is None:
        return None
    i, line = found
    if line.endswith(":"):
        rest = (x for x in lines[i + 1 :] if x and not x.startswith(_SNIPPET_HEADERS))
        line = f"{line} {next(rest, '')}".rstrip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


_TRAIN_DECISION = re.compile(r"\[FailurePolicy\] (RETRY|RAISE)")
_TRAIN_FAILURES = re.compile(r"Error count: (\d+) \(max allowed: (\S+)\)")


def traceback_line(lines: list[str]) -> str:
    """One console line for a process's traceback: its exception, and what Train decided where it
    is Train's controller telling of a failed run (a worker's traceback and the controller's two
    copies of it were 80 lines on the console for one diverged teacher)."""
    text = "\n".join(lines)
    exception = failure_line(text) or "a traceback"
    decision = _TRAIN_DECISION.search(text)
    if decision is None:
        return f"{exception} (the traceback: sweep.log)"
    failures = _TRAIN_FAILURES.search(text)
    counted = f" (failure {failures[1]}, {failures[2]} allowed)" if failures else ""
    what = "Train runs it again" if decision[1] == "RETRY" else "Train gives up"
    return f"a Train run failed{counted}, {what}: {exception}"


def driver_line(message: str) -> None:
    """A line of the driver's own: through the sweep's console while it has one, else printed."""
    if _active is not None:
        _active.show(message)
    else:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def final_progress(trials: list, num_samples: int) -> None:
    """The sweep's last progress line, from its stored trials (what a resume would see)."""
    if _active:
        _active.show(progress_line(trials, num_samples, _active.elapsed()))


# Tune's warning as the first Ctrl-C arrives (ray/tune/tune.py); the console otherwise shows
# Ray's errors only, and the user would see nothing until the trials have been stopped
TUNE_STOP_SIGNAL = "Stop signal received"


class StopSignalNotice(logging.Handler):
    def __init__(self, console: SweepConsole) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith(TUNE_STOP_SIGNAL):
            self.console.show("interrupted: saving the sweep's state and stopping its trials (Ctrl-C again skips it)")


@contextlib.contextmanager
def sweep_console(
    experiment: Storage,
    verbose: bool = False,
    on_tick: Callable[[], object] | None = None,
    may_write: Callable[[], bool] = lambda: True,
) -> Iterator[SweepConsole]:
    """While a sweep runs on this driver: its log file takes Ray's, Tune's and Optuna's records and
    every line of the cluster's output; the console shows what SweepConsole lets through.
    `may_write`: whether this driver still drives the sweep (see SweepLog)."""
    global _active
    import optuna

    log = SweepLog(experiment, may_write)
    console = SweepConsole(log, verbose, on_tick=on_tick)
    file_handler = LogFileHandler(log)
    loggers = [logging.getLogger("ray"), logging.getLogger("optuna")]
    for logger in loggers:
        logger.addHandler(file_handler)
    stop_notice = None if verbose else StopSignalNotice(console)  # verbose: Ray's own warning shows
    if stop_notice:
        loggers[0].addHandler(stop_notice)
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    routing = worker_output_to(console.worker_output, keep_ray_printer=verbose)
    notices = contextlib.nullcontext() if verbose else driver_notices_to(console.driver_notice)
    _active = console
    try:
        with routing, notices:
            yield console
    finally:
        _active = None
        optuna.logging.set_verbosity(optuna_level)
        for logger in loggers:
            logger.removeHandler(file_handler)
        if stop_notice:
            loggers[0].removeHandler(stop_notice)
        log.close()
