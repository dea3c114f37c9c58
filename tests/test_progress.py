"""The sweep console's own logic: what it shows, what it keeps in the log, the progress line."""

from __future__ import annotations

import io
import shutil
from types import SimpleNamespace

import pytest

from remem_ray.console import MARK
from remem_ray.storage import Storage
from remem_ray.sweep.progress import ProgressCallback, SweepConsole, SweepLog, progress_line


def _console(tmp_path, verbose=False):
    out = io.StringIO()
    log = SweepLog(Storage(str(tmp_path)).child("sweeps", "s"))
    return SweepConsole(log, verbose=verbose, out=out), out, log


def test_the_console_shows_marked_lines_and_tracebacks_and_the_log_keeps_everything(tmp_path):
    console, out, log = _console(tmp_path)
    noise = "Reporting training result 1: TrainingReport(checkpoint=..., metrics={...})"
    epoch = f"{MARK}trial 1a2b student: epoch 1/3  val_acc 0.5"
    console.worker_output(
        {"lines": [noise, epoch, "Checkpoint successfully created at: ..."], "pid": 9, "is_err": False}
    )
    console.worker_output({"lines": ["Traceback (most recent call last):", "ValueError: x"], "pid": 9, "is_err": True})
    console.show("progress 0m30s: trials 0/4 done")
    shown = out.getvalue()
    assert "trial 1a2b student: epoch 1/3  val_acc 0.5" in shown and MARK not in shown
    assert "TrainingReport(" not in shown and "Checkpoint successfully created" not in shown
    assert "ValueError: x" in shown and "progress 0m30s" in shown
    log.close()
    kept = (tmp_path / "sweeps" / "s" / "sweep.log").read_text()
    for line in (noise, epoch, "Checkpoint successfully created", "ValueError: x", "progress 0m30s"):
        assert line in kept


WORKER_TRACEBACK = """Error in training function:
Traceback (most recent call last):
  File "/work/main/remem_ray/train/loop.py", line 323, in _refuse_divergence
    raise TrainingDivergedError(
remem_ray.errors.TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan); nothing of that epoch is kept
"""
CONTROLLER_RETRY = """[FailurePolicy] RETRY
  Source: worker group
  Error count: 1 (max allowed: 1)
Error: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/remem_ray/sweep/trial.py", line 107, in teach_then_distil_in_worker
remem_ray.errors.TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan); nothing of that epoch is kept
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/remem_ray/sweep/trial.py", line 107, in teach_then_distil_in_worker
remem_ray.errors.TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan); nothing of that epoch is kept
"""


DIVERGED = "TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan); nothing of that epoch is kept"


def _shown(out) -> list[str]:
    """The console's lines, less their time."""
    return [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]


def test_a_workers_traceback_and_trains_retry_are_a_line_each_on_the_console(tmp_path):
    """A diverged teacher put 80 lines on the console: the worker's traceback, then Train's
    controller's RETRY block holding it twice, per attempt. Now a line each; the log keeps all."""
    console, out, log = _console(tmp_path)
    for who, text in (("RayTrainWorker", WORKER_TRACEBACK), ("TrainController", CONTROLLER_RETRY)):
        console.worker_output({"lines": text.splitlines(), "pid": 7, "actor_name": who, "is_err": True})
    console.worker_output(
        {
            "lines": CONTROLLER_RETRY.replace("RETRY", "RAISE").replace("count: 1", "count: 2").splitlines(),
            "pid": 7,
            "actor_name": "TrainController",
            "is_err": True,
        }
    )
    shown, diverged = _shown(out), DIVERGED
    assert shown == [
        f"(RayTrainWorker pid=7) {diverged} (the traceback: sweep.log)",
        f"(TrainController pid=7) a Train run failed (failure 1, 1 allowed), Train runs it again: {diverged}",
        f"(TrainController pid=7) a Train run failed (failure 2, 1 allowed), Train gives up: {diverged}",
    ]
    log.close()
    kept = (tmp_path / "sweeps" / "s" / "sweep.log").read_text()
    assert kept.count("Traceback (most recent call last)") == 5 and "[FailurePolicy] RAISE" in kept


def test_a_tracebacks_line_names_the_trial_whose_process_raised_it(tmp_path):
    """Ray's batches name a process only ("RayTrainWorker pid=7"): with two trials training, a
    traceback line did not say whose it was. A Train worker's session writes one line, to the log
    alone, naming its trial (the smoke sweep checks the real one's); the console names the trial
    on that process's traceback."""
    console, out, log = _console(tmp_path)
    worker = {"pid": 7, "ip": "10.0.0.1", "actor_name": "RayTrainWorker"}
    announce = "trial 1d233b08 teacher 9374df30: worker rank 1 of 2, pid 7"  # as RayTrainSession writes it
    console.worker_output({**worker, "lines": [announce], "is_err": False})
    console.worker_output({**worker, "lines": WORKER_TRACEBACK.splitlines(), "is_err": True})
    # the same pid on another node or in a process of another kind (a pid reused), and a process
    # that never named a trial: as before
    for other in ({**worker, "ip": "10.0.0.2"}, {**worker, "actor_name": "TrainController"}, {**worker, "pid": 8}):
        console.worker_output({**other, "lines": WORKER_TRACEBACK.splitlines(), "is_err": True})
    # a trial driver's marked line names its process too
    driver = {"pid": 9, "ip": "10.0.0.1", "actor_name": "ImplicitFunc"}
    console.worker_output({**driver, "lines": [f"{MARK}trial ab12cd34: training teacher 564f4fc8"], "is_err": False})
    console.worker_output({**driver, "lines": WORKER_TRACEBACK.splitlines(), "is_err": True})
    shown, diverged = _shown(out), DIVERGED
    assert shown == [
        f"trial 1d233b08 (RayTrainWorker pid=7) {diverged} (the traceback: sweep.log)",
        f"(RayTrainWorker pid=7) {diverged} (the traceback: sweep.log)",
        f"(TrainController pid=7) {diverged} (the traceback: sweep.log)",
        f"(RayTrainWorker pid=8) {diverged} (the traceback: sweep.log)",
        "trial ab12cd34: training teacher 564f4fc8",
        f"trial ab12cd34 (ImplicitFunc pid=9) {diverged} (the traceback: sweep.log)",
    ]
    log.close()
    assert announce in (tmp_path / "sweeps" / "s" / "sweep.log").read_text()  # the log keeps it


def test_a_train_controllers_failure_line_names_the_trial_whose_run_failed(tmp_path, capsys):
    """Train's controller said "a Train run failed ..., Train runs it again" with no trial: with
    several trials training, whose run? Each run's controller now has a callback that names the
    trial on its stderr as its workers' errors arrive, before Train's decision on that stream."""
    from remem_ray.sweep.train_callbacks import NamesItsTrial

    NamesItsTrial("3c143118").after_exception(None, {1: RuntimeError("x"), 0: RuntimeError("y")})
    named = capsys.readouterr().err.splitlines()
    assert named == ["trial 3c143118: its Train run's workers failed (rank 0, 1)"]
    console, out, log = _console(tmp_path)
    controller = {"pid": 11, "ip": "10.0.0.1", "actor_name": "TrainController", "is_err": True}
    console.worker_output({**controller, "lines": [*named, *CONTROLLER_RETRY.splitlines()]})  # one batch
    again = CONTROLLER_RETRY.replace("RETRY", "RAISE").replace("count: 1", "count: 2").splitlines()
    console.worker_output({**controller, "lines": named})  # or a batch of its own first
    console.worker_output({**controller, "lines": again})
    assert _shown(out) == [
        f"trial 3c143118 (TrainController pid=11) a Train run failed (failure 1, 1 allowed), Train runs it again: "
        f"{DIVERGED}",
        f"trial 3c143118 (TrainController pid=11) a Train run failed (failure 2, 1 allowed), Train gives up: "
        f"{DIVERGED}",
    ]  # the naming line itself stays in the log
    log.close()


# Train's controller on a Train worker SIGKILLed (tests/test_faults.py): no traceback in it
WORKER_DIED_RETRY = """trial 68468f5c: its Train run's workers failed (rank 0)
[FailurePolicy] RETRY
  Source: worker group
  Error count: 1 (max allowed: 2)
Error: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
The actor died unexpectedly before finishing this task.
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed."""


@pytest.mark.parametrize("is_err", [False, True])
def test_train_retrying_a_run_whose_worker_died_is_a_line_naming_the_trial(is_err, tmp_path):
    """Its block has no traceback (the worker's death is not an exception raised anywhere): the
    console showed nothing of it, a raylet notice naming no trial aside."""
    console, out, log = _console(tmp_path)
    batch = {"pid": 11, "ip": "10.0.0.1", "actor_name": "TrainController", "is_err": is_err}
    console.worker_output({**batch, "lines": WORKER_DIED_RETRY.splitlines()})
    assert _shown(out) == [
        "trial 68468f5c (TrainController pid=11) a Train run failed (failure 1, 2 allowed), Train runs it again: "
        "WorkerGroupError: Training failed due to worker errors: A worker health check failed."
    ]
    log.close()


def test_the_raylets_worker_count_warning_goes_to_the_log_and_other_notices_to_the_console_too(tmp_path):
    console, out, log = _console(tmp_path)
    size = (
        "WARNING: 8 PYTHON worker processes have been started on node: 9b69 with address: 127.0.0.1, "
        "which is 4x the maximum expected startup concurrency (2)."
    )
    killed = "Task was killed due to the node running low on memory."
    console.driver_notice({"lines": [size], "pid": "raylet", "is_err": False})
    console.driver_notice({"lines": [killed], "pid": "raylet", "is_err": False})
    log.close()
    assert out.getvalue() == f"(raylet) {killed}\n"
    kept = (tmp_path / "sweeps" / "s" / "sweep.log").read_text()
    assert f"(raylet) {size}" in kept and f"(raylet) {killed}" in kept


def test_verbose_leaves_the_cluster_output_to_rays_printer(tmp_path):
    console, out, log = _console(tmp_path, verbose=True)
    console.worker_output({"lines": [f"{MARK}epoch 1"], "pid": 9, "is_err": False})
    assert out.getvalue() == ""
    console.show("progress 0m30s")  # the driver's own lines show either way
    assert "progress 0m30s" in out.getvalue()
    log.close()
    assert "epoch 1" in (tmp_path / "sweeps" / "s" / "sweep.log").read_text()


def _trial(trial_id, status, **result):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=result)


def test_progress_line_counts_trials_teachers_and_the_best_student():
    trials = [
        _trial("a", "TERMINATED", teacher_trained=1, best_val_acc=0.7, epoch=3, epochs=3),
        _trial("b", "TERMINATED", teacher_trained=0, best_val_acc=0.8, epoch=1, epochs=3),  # stopped by ASHA
        _trial("c", "RUNNING"),  # waiting for its teacher: no result yet
        _trial("d", "ERROR", teacher_trained=0),
    ]
    line = progress_line(trials, num_samples=6, elapsed="1m05s")
    assert line == (
        "progress 1m05s: trials 2/6 done (1 stopped early), 1 failed, 1 running, 2 pending | "
        "teachers 1 trained, 2 reused | best student val 0.8000 (trial b)"
    )
    assert "no student yet" in progress_line([_trial("c", "PENDING")], 2, "0m01s")
    # ties go as in summary.json: a finished trial before a stopped one, then the first id
    tie = [
        _trial("z", "TERMINATED", best_val_acc=0.9, epoch=3, epochs=3),
        _trial("y", "TERMINATED", best_val_acc=0.9, epoch=3, epochs=3),
    ]
    assert progress_line(tie, 2, "0m01s").endswith("(trial y)")


def test_the_progress_callback_survives_tunes_pickling():
    import pickle

    callback = pickle.loads(pickle.dumps(ProgressCallback(num_samples=4, every_s=5.0)))
    assert (callback.num_samples, callback.every_s) == (4, 5.0)


def test_a_failing_copy_is_logged_and_the_sweep_goes_on(tmp_path):
    def outage():
        raise OSError("S3 unreachable")

    console, out, log = _console(tmp_path)
    console.on_tick = outage
    console.tick()
    log.close()
    assert (
        "could not update the sweep's copies: OSError: S3 unreachable"
        in (tmp_path / "sweeps" / "s" / "sweep.log").read_text()
    )


def test_an_s3_sweep_log_leaves_no_local_copy_once_copied_and_keeps_it_when_the_copy_fails(s3, capsys):
    """The driver's log of an s3:// sweep is written locally, then copied up: the local folder
    goes once the bucket has the log, and stays (named) when the copy failed."""
    experiment = Storage(f"s3://{s3['bucket']}/root", endpoint=s3["endpoint"]).child("sweeps", "s")
    log = SweepLog(experiment)
    log.write("trial 1 started")
    log.close()
    assert not log.path.parent.exists()
    assert "trial 1 started" in experiment.read_text("sweep.log")

    failing = SweepLog(experiment)
    failing.write("trial 2 started")
    failing.experiment = Storage("s3://no-such-bucket-remem/x", endpoint=s3["endpoint"])
    failing.close()
    assert failing.path.exists() and "trial 2 started" in failing.path.read_text()
    assert f"it stays in {failing.path}" in capsys.readouterr().err
    shutil.rmtree(failing.path.parent)


def test_a_driver_that_lost_the_sweep_never_copies_its_log_over_the_new_drivers(s3, capsys):
    """The log of a driver whose lease passed to another (it was paused past the stale window)
    is kept locally: before, its tick and its close copied it over the new driver's log."""
    experiment = Storage(f"s3://{s3['bucket']}/root", endpoint=s3["endpoint"]).child("sweeps", "lost")
    holds = [True]
    log = SweepLog(experiment, may_write=lambda: holds[0])
    console = SweepConsole(log, on_tick=lambda: experiment.write_text("study-copy", "old driver"))
    log.write("old driver's line")
    holds[0] = False  # the lease passed; the new driver writes its log
    experiment.write_text("sweep.log", "new driver's log\n")
    console.tick()
    log.close()
    assert experiment.read_text("sweep.log") == "new driver's log\n" and not experiment.is_file("study-copy")
    assert "old driver's line" in log.path.read_text()
    assert f"this driver's sweep log stays in {log.path}" in capsys.readouterr().err
    shutil.rmtree(log.path.parent)


def test_a_snapshot_caught_half_written_is_read_again_and_a_broken_one_named_in_one_line(tmp_path, monkeypatch):
    """`remem sweep status` during a sweep on a local root: Tune rewrites searcher-state-*.pkl in
    place, and a reader can catch it half written. Before, the unpickling error ended status with
    a traceback."""
    import pickle

    import optuna

    from remem_ray.errors import ResourceError
    from remem_ray.sweep import tune_state as tune_state_module  # read_settled, which waits between looks
    from remem_ray.sweep.distinct import DUPLICATE_OF
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.results import _duplicates_answered

    layout = SweepLayout(Storage(str(tmp_path)), "s")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 1})
    trial = study.ask()
    trial.set_user_attr(DUPLICATE_OF, "t1")
    study.tell(trial, 0.5)
    whole = pickle.dumps({"study": study})
    layout.experiment.write_bytes("searcher-state-1.pkl", whole[: len(whole) // 2])
    pauses: list[float] = []

    def tune_finishes_writing(seconds):
        pauses.append(seconds)
        layout.experiment.write_bytes("searcher-state-1.pkl", whole)

    monkeypatch.setattr(tune_state_module.time, "sleep", tune_finishes_writing)
    assert _duplicates_answered(layout) == 1 and len(pauses) == 1
    layout.experiment.write_bytes("searcher-state-1.pkl", whole[:100])
    monkeypatch.setattr(tune_state_module.time, "sleep", pauses.append)
    with pytest.raises(ResourceError, match="searcher state in .* cannot be read"):
        _duplicates_answered(layout)


# A dead Train worker's failure as Tune writes it to error.txt (trimmed), then a second failure of
# the same trial: an exception a worker raised, inside the run's error snippet.
TUNE_ERROR_FILE = """Failure # 1 (occurred at 2026-12-06_21-05-52)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=11859, ip=127.0.0.1, repr=remem_trial)
  File "/work/main/.venv/lib/python3.11/site-packages/ray/train/v2/api/data_parallel_trainer.py", line 195, in fit
    raise result.error
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, 88def2d2b8d9bdc4fece662001000000),
)
The actor died unexpectedly before finishing this task.
	class_name: RayTrainWorker
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: ...
"""
SECOND_FAILURE = """Failure # 2 (occurred at 2026-12-06_21-07-01)
ray::ImplicitFunc.train() (pid=12001)
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/remem_ray/train/loop.py", line 120, in run_epochs
    raise ValueError("data.img_size: 16 is not what the teacher was built for")
ValueError: data.img_size: 16 is not what the teacher was built for
"""


def test_a_failure_is_one_line_naming_its_exception_and_tunes_traceback_stays_in_the_log(tmp_path, monkeypatch):
    """Before, the console had Tune's whole traceback (76 lines for one dead worker) and then a line
    that named only the trial folder."""
    import logging

    from remem_ray.sweep import progress as progress_module
    from remem_ray.sweep.progress import failure_line
    from remem_ray.sweep.tune_adapter import TuneFailureRecordsOffConsole

    assert failure_line(TUNE_ERROR_FILE) == (
        "WorkerGroupError: Training failed due to worker errors: A worker health check failed."
    )
    assert failure_line(TUNE_ERROR_FILE + SECOND_FAILURE) == (
        "ValueError: data.img_size: 16 is not what the teacher was built for"
    )  # the newest failure's, where the worker raised
    assert failure_line("Failure # 1\nremem_ray.errors.ResourceError: storage: s3://b/x: refused\n") == (
        "ResourceError: storage: s3://b/x: refused"
    )
    diverged = "teacher diverged in epoch 2 (val_loss nan); nothing of that epoch is kept: lower teacher.optimizer.lr"
    assert failure_line(f"Failure # 1\n  raise X\nremem_ray.errors.TrainingDivergedError: {diverged}\n") == (
        f"TrainingDivergedError: {diverged}"
    )
    assert failure_line("no exception named here") is None

    console, out, log = _console(tmp_path)
    monkeypatch.setattr(progress_module, "_active", console)
    error_file = tmp_path / "error.txt"
    error_file.write_text(TUNE_ERROR_FILE)
    trial = SimpleNamespace(trial_id="8f46bef6", path="/r/sweeps/s/trial_8f46bef6", error_file=str(error_file))
    callback = ProgressCallback(num_samples=2)
    callback.on_trial_recover(0, [], SimpleNamespace(**vars(trial), num_failures=1))
    callback.on_trial_error(0, [], trial)
    assert (
        out.getvalue()
        .splitlines()[-2]
        .endswith(
            "trial 8f46bef6 failed, Tune runs it again (failure 1): WorkerGroupError: Training failed due to "
            "worker errors: A worker health check failed."
        )
    )
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith(
            "trial 8f46bef6 failed: WorkerGroupError: Training failed due to worker errors: A worker health check "
            "failed. (the whole error: error.txt in /r/sweeps/s/trial_8f46bef6)"
        )
    )

    keep = TuneFailureRecordsOffConsole()

    def record(name, msg):
        return logging.LogRecord(name, logging.ERROR, "x.py", 1, msg, (), None)

    assert not keep.filter(record("ray.tune.execution.tune_controller", "Trial task failed for trial remem_trial_1"))
    assert not keep.filter(record("ray.tune.tune", "Trials did not complete: %s"))
    assert keep.filter(record("ray.tune.execution.tune_controller", "Experiment state snapshotting failed:"))
    assert keep.filter(record("ray.train", "Trial task failed for trial x"))  # only Tune's own records
    log.close()
