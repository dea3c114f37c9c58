"""Fault injection on real local sweeps: the driver SIGKILLed during a teacher's training and
between trials, a Train worker killed mid-epoch, Ctrl-C, a teacher's holder paused past its
lease, trials queued for a run slot. Each sweep runs as a `remem` process; every process it
starts is recorded and ended by PID (see servers.ProcessTree).

The S3 outage and the credential scan run with the S3 sweep in test_sweep_integration.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers.sweeps import (
    SMOKE,
    experiment_trials,
    remem_env,
    run_remem,
    searcher_study,
    start_remem,
    stored_study,
    student_checkpoint_epoch,
)

from remem_ray.config import SweepSpec
from remem_ray.storage import Storage
from remem_ray.sweep.registry import TeacherRegistry

pytestmark = [pytest.mark.integration, pytest.mark.faults]

STUDENT_EPOCHS = 5
# a point whose student learns (the smoke spec also searches a student_lr at which it barely does)
LEARNING_POINT = {"rho": 0.05, "alpha": 0.9, "teacher_epoch": 4, "student_lr": 0.002}


def _spec(tmp_path: Path, name: str, **sweep) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = name
    spec["student"]["epochs"] = STUDENT_EPOCHS
    spec["sweep"].update({"num_samples": 2, "asha": {"enabled": False}, **sweep})
    spec["storage"]["root"] = str(tmp_path / "results")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(experiment: Path, trial_id: str) -> list[dict]:
    path = experiment / f"trial_{trial_id}" / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _claimed(holds: Path, point: str) -> dict | None:
    """Who holds a fault point (remem_ray.faultpoints): {"pid", "output"}, once claimed."""
    path = holds / f"{point.replace(':', '-')}.claimed"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not yet, or being written
        return None


def _finished(experiment: Path) -> dict[str, str]:
    """{trial: its result.json} of every trial Tune has recorded as finished."""
    trials = experiment_trials(experiment)
    done = [t for t, s in trials.items() if s["status"] == "TERMINATED"]
    return {t: (experiment / f"trial_{t}" / "result.json").read_text() for t in done}


def test_driver_sigkilled_in_teacher_training_then_in_distillation_resumes_without_rerunning_finished_trials(tmp_path):
    """One sweep, its driver SIGKILLed twice, then resumed to the end (one sweep, not two: the
    suite's time). Three trials: the smoke spec's first two points (distinct teachers) and its
    third, which distils from the first one's teacher, started before or after a kill: a stored
    teacher is reused across a resume.

    Each kill comes at a moment the sweep is made to wait at (a held Train run), never at one a
    polling loop hopes to catch: the verdict must not depend on the machine's speed.
    1. During a teacher's training: a teacher held after its epoch 1 of 4.
    2. During distillation, between trials: a student's Train worker, held after reporting epoch
       2, is killed once Train has registered that checkpoint (Train retries it from there); the
       driver is killed once one trial has finished and a student is held at epoch 4 of 5 (so
       the sweep cannot end under the test)."""
    name = "kill"
    num_trials = 3
    path = _spec(tmp_path, name, num_samples=num_trials)
    root = tmp_path / "results"
    experiment = root / "sweeps" / name
    env = remem_env(tmp_path)
    resume = ["sweep", "resume", name, "--storage", str(root)]
    finished: dict[str, str] = {}  # trial -> its result.json, as it was when a kill found it finished
    studies_before = []  # the searcher's study at each kill

    def killed_sweep(args: list[str], hold_at: str, holds: Path, killed) -> Path:
        """Runs `remem args` with `hold_at` held, SIGKILLs it (and all it started) once `killed()`."""
        holds.mkdir()
        hold_env = {"REMEM_TEST_HOLD_AT": hold_at, "REMEM_TEST_HOLD_DIR": str(holds)}
        proc, tree = start_remem(args, tmp_path, {**env, **hold_env})
        try:
            deadline = time.time() + 400
            while not killed():
                assert proc.poll() is None, proc.log_path.read_text()[-3000:]
                assert time.time() < deadline, "the kill's moment never came: " + proc.log_path.read_text()[-3000:]
                time.sleep(0.3)
        finally:
            tree.kill_all()  # the driver (if still running) and everything it started
        for trial, result in _finished(experiment).items():  # as the first kill that found it finished saw it
            finished.setdefault(trial, result)
        if list(experiment.glob("searcher-state-*.pkl")):
            studies_before.append(searcher_study(experiment))
        return proc.log_path

    # 1. a teacher held after its epoch 1 of 4
    teacher_holds = tmp_path / "holds-teacher"
    killed_sweep(["sweep", "run", str(path)], "teacher:1", teacher_holds, lambda: _claimed(teacher_holds, "teacher:1"))

    registry = TeacherRegistry(Storage(str(root / "teachers")))
    held_in_run_1 = _claimed(teacher_holds, "teacher:1")["output"]

    def held_teacher_stored() -> bool:
        keys = [folder.name for folder in (root / "teachers").iterdir() if folder.name in held_in_run_1]
        return any(registry.set_in_use(key) is not None for key in keys)

    # 2. resumed: a student's worker killed at epoch 2 and retried; then the driver, between trials
    holds = tmp_path / "holds-student"
    worker_kill = {}  # trial -> epochs it had reported when its Train worker was killed
    worker_retry = {}  # trial -> its result rows once Train had retried it (before the driver kill)

    def between_trials() -> bool:
        held = _claimed(holds, "student:2")
        if not worker_kill:
            # the held run cannot move on: kill its worker once Train has registered its checkpoint
            if held and student_checkpoint_epoch(experiment, trial := Path(held["output"]).name) >= 2:
                worker_kill[trial] = len(_rows(experiment, trial))
                psutil.Process(held["pid"]).kill()
            return False
        now = {t: _rows(experiment, t) for t in worker_kill}
        retried = {t: rows for t, rows in now.items() if any(r["start_epoch"] > 1 for r in rows)}
        # and the teacher held in the first run is stored: its checks below read this run's console
        # (it is finished by now where the first run held the first point's teacher, which usually
        # gets there first, but a trial on the other could finish and the third be held meanwhile)
        if retried and _finished(experiment) and _claimed(holds, "student:4") and held_teacher_stored():
            worker_retry.update(retried)
            return True
        return False

    resumed_log = killed_sweep(resume, "student:2,student:4", holds, between_trials)

    # 3. resumed again, to the end
    rc, out = run_remem(resume, tmp_path, env)
    assert rc == 0, out[-3000:]
    summary = json.loads((experiment / "summary.json").read_text())
    rows = summary["trials"]
    assert len(rows) == num_trials and all(r["state"] == "TERMINATED" for r in rows), rows
    assert all(r["epochs_done"] == STUDENT_EPOCHS and r["student_val_acc"] is not None for r in rows)
    assert summary["best"] is not None
    # every distinct teacher trained (to completion) once, whatever was interrupted
    assert summary["teacher_trainings_performed"] == summary["distinct_teacher_keys"] == 2
    assert summary["teacher_reuses"] == num_trials - 2
    assert finished  # the second kill came between trials
    for t, text in finished.items():  # no finished trial ran again
        assert (experiment / f"trial_{t}" / "result.json").read_text() == text, t
    study = searcher_study(experiment)
    assert [t.number for t in study.trials] == list(range(num_trials))
    # the copy Optuna's tools open (optuna.db) is the resumed study, whole
    stored = stored_study(experiment, name)
    assert [(t.number, t.state, t.params, t.value) for t in stored.trials] == [
        (t.number, t.state, t.params, t.value) for t in study.trials
    ]
    assert all(t.state.name == "COMPLETE" for t in stored.trials)
    for study_before in studies_before:
        for old, new in zip(study_before.trials, study.trials):
            if old.state.name != "WAITING":  # enqueued points not yet asked have no params yet
                assert old.params == new.params

    # 1: the held teacher went on from its stored state (its resume/state.pt, written at epoch 1
    # before the hold), not from scratch: the first resume's console shows it resuming at epoch 2,
    # and the log, from that line on, its epochs from 2 on, each once (a retraining from scratch
    # shows "epoch 1/4" again; the console shows a teacher's first, saved and last epochs). The
    # second kill waited for it to be stored.
    (held_key,) = [k for k in {r["teacher_key"] for r in rows} if k in held_in_run_1]
    tag = f" teacher {held_key[:8]}: "  # its lines: "[time] trial <id> teacher <key[:8]>: epoch 2/4 ..."
    teacher_epochs = yaml.safe_load(path.read_text())["teacher"]["epochs"]
    resumed = f"resuming at epoch 2 of {teacher_epochs}"

    def epochs(lines: list[str]) -> list[int]:
        held = [line.split(tag, 1)[1] for line in lines if tag in line]
        return [int(m[1]) for m in (re.match(rf"epoch (\d+)/{teacher_epochs}\b", line) for line in held) if m]

    console = resumed_log.read_text().splitlines()
    assert resumed in [line.split(tag, 1)[1] for line in console if tag in line], console
    assert min(epochs(console)) == 2 and max(epochs(console)) == teacher_epochs, console
    log = (experiment / "sweep.log").read_text().splitlines()
    since = next(i for i, line in enumerate(log) if tag in line and line.endswith(resumed))
    assert sorted(epochs(log[since:])) == list(range(2, teacher_epochs + 1)), log[since:]

    # 2: Train restarted the killed worker from its last checkpoint: at most one epoch's work was lost
    assert worker_retry, worker_kill
    # and its controller's line on the console said whose run it was (train_callbacks.NamesItsTrial)
    for trial in worker_kill:
        assert any(
            line.split("] ", 1)[-1].startswith(f"trial {trial} (TrainController pid=") and "Train runs it again" in line
            for line in console
        ), [line for line in console if "Train run" in line]
    for trial, rows_then in worker_retry.items():
        retry = next(r for r in rows_then if r["start_epoch"] > 1)
        assert retry["start_epoch"] >= worker_kill[trial], (retry, worker_kill[trial])
        assert retry["epoch"] == retry["start_epoch"]


def _wait_until(condition, proc, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended while waiting for {what}: " + proc.log_path.read_text()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_ctrl_c_ends_the_sweep_with_code_130_and_resume_completes_it_a_trial_failed_for_good_included(tmp_path):
    """SIGINT (Ctrl-C) makes Tune save its state and return normally: the sweep must not then end
    as if it were done (exit 0, a final summary), or `remem sweep run ... && deploy` goes on with
    half a sweep. Failed before: exit code 0.

    Before the interrupt, the other trial fails for good (its student's worker killed, no retries
    left: max_failures 0): the console names its exception in one line (Tune's traceback goes to
    the log). Resume reruns it under its id from its last checkpoint; Tune does not tell the
    searcher, which reopens it itself. Failed before: the rerun finished (summary: TERMINATED, its
    score) while the study kept only its FAIL."""
    name = "ctrl-c"
    path = _spec(tmp_path, name, max_failures=0)
    root = tmp_path / "results"
    experiment = root / "sweeps" / name
    env = remem_env(tmp_path)
    holds = tmp_path / "holds"
    holds.mkdir()
    # the first student to finish epoch 2 is held there (and killed); the other passes it and is
    # held after epoch 4, so the sweep cannot end under the test
    run_env = {**env, "REMEM_TEST_HOLD_AT": "student:2,student:4", "REMEM_TEST_HOLD_DIR": str(holds)}
    proc, tree = start_remem(["sweep", "run", str(path)], tmp_path, run_env)

    def held_with_its_checkpoint(point: str, epoch: int):
        def check() -> bool:
            held = _claimed(holds, point)
            return held is not None and student_checkpoint_epoch(experiment, Path(held["output"]).name) >= epoch

        return check

    try:
        _wait_until(held_with_its_checkpoint("student:2", 2), proc, 400, "a student held after epoch 2, registered")
        failed_trial = Path(_claimed(holds, "student:2")["output"]).name
        psutil.Process(_claimed(holds, "student:2")["pid"]).kill()  # no retry left: the trial errors
        _wait_until(
            lambda: f"trial {failed_trial} failed: " in proc.log_path.read_text(), proc, 180, "the trial's failure"
        )
        # the interrupt comes mid-sweep: the other student held after its epoch 4, that checkpoint registered
        _wait_until(held_with_its_checkpoint("student:4", 4), proc, 400, "a student held after epoch 4, registered")
        # a second driver of the running sweep is refused (it restarted the same trials twice)
        rc, out = run_remem(["sweep", "resume", str(experiment)], tmp_path, env, timeout=300)
        assert rc == 2 and "remem: error: sweep: 'ctrl-c' is being run by driver " in out, out[-3000:]
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        tree.kill_all()
    log = proc.log_path.read_text()
    assert rc == 130, log[-3000:]
    resume = f"remem sweep resume {experiment}"
    assert "remem: interrupted: " in log and f"`{resume}` continues the sweep" in log, log[-3000:]
    assert "interrupted: saving the sweep's state and stopping its trials" in log  # at once, not only at the end
    # the failure in one line on the console; Tune's traceback of it in the sweep log only
    failure = f"trial {failed_trial} failed: WorkerGroupError: Training failed due to worker errors: A worker health"
    assert failure in log and "Traceback" not in log and "Trial task failed" in (experiment / "sweep.log").read_text()
    # the last progress line counts what is stored: the held trial is not done (it read "2/2 done")
    progress = [line for line in log.splitlines() if "] progress " in line]
    assert progress and "trials 0/2 done (0 stopped early), 1 failed" in progress[-1], progress
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["unfinished"] >= 1
    assert summary["best"] is None or summary["best"]["state"] == "TERMINATED"  # never a running trial's
    assert [t.state.name for t in searcher_study(experiment).trials].count("FAIL") == 1

    rc, out = run_remem(["sweep", "resume", str(experiment)], tmp_path, env)
    assert rc == 0, out[-3000:]
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["unfinished"] == 0
    assert [r["state"] for r in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    assert all(r["epochs_done"] == STUDENT_EPOCHS for r in summary["trials"])
    # the failed trial's rerun is in the study: a new trial at its point, its score the summary's
    row = next(r for r in summary["trials"] if r["trial_id"] == failed_trial)
    for study in (searcher_study(experiment), stored_study(experiment, name)):  # Tune's and Optuna tools' copy
        (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
        (rerun,) = [t for t in study.trials if t.user_attrs.get("rerun_of") == failed.number]
        assert rerun.state.name == "COMPLETE" and rerun.params == failed.params == row["params"]
        assert rerun.value == row["student_val_acc"]
        assert len(rerun.intermediate_values) == STUDENT_EPOCHS - 2  # the epochs it ran again, from its checkpoint
        assert [t.state.name for t in study.trials].count("COMPLETE") == 2  # the other trial's too


def test_a_teacher_holder_paused_past_the_stale_window_changes_nothing_once_it_wakes(tmp_path):
    """Two trials need one teacher. The first holds the lease and trains; its Train run is held
    right after epoch 2's lease check, before that epoch's writes, and its driver (the lease's
    heartbeat) is paused with SIGSTOP. After the stale window the second trial takes the lease
    over, continues the teacher from the first one's state and publishes it. Then both wake:
    the first run writes its epoch 2 into its own generation's folder, finds the lease lost at
    its next check and stops; its trial distils from the second one's teacher. The set in use,
    and every file the second holder wrote, stay as they were."""
    import signal

    points = [{**LEARNING_POINT, "teacher_epoch": 2}, {**LEARNING_POINT, "teacher_epoch": 4}]  # one teacher key
    path = _spec(tmp_path, "paused", points_to_evaluate=points)
    spec = yaml.safe_load(path.read_text())
    spec["student"]["epochs"] = 2
    spec["sweep"]["lease_stale_after_s"] = 20  # the window the pause outlasts (60 s by default)
    path.write_text(yaml.safe_dump(spec))
    holds = tmp_path / "holds"
    holds.mkdir()
    env = {**remem_env(tmp_path), "REMEM_TEST_HOLD_AT": "holder:1,teacher-checked:2", "REMEM_TEST_HOLD_DIR": str(holds)}
    registry = TeacherRegistry(Storage(str(tmp_path / "results" / "teachers")))
    proc, tree = start_remem(["sweep", "run", str(path)], tmp_path, env)
    paused_driver = None
    try:
        _wait_until(lambda: _claimed(holds, "holder:1") is not None, proc, 300, "the first holder's claim")
        paused_driver = _claimed(holds, "holder:1")["pid"]
        (holds / "holder-1.release").touch()
        _wait_until(lambda: _claimed(holds, "teacher-checked:2") is not None, proc, 300, "its epoch-2 lease check")
        (key,) = [p.name for p in (tmp_path / "results" / "teachers").iterdir()]
        os.kill(paused_driver, signal.SIGSTOP)  # the heartbeat stops: the lease goes stale
        _wait_until(lambda: _published_by(registry, key, 2), proc, 400, "the second holder to publish")
        in_use = Path(registry.set_in_use(key).uri())
        published = {p: p.read_bytes() for p in in_use.rglob("*") if p.is_file()}
        os.kill(paused_driver, signal.SIGCONT)
        paused_driver = None
        (holds / "teacher-checked-2.release").touch()
        proc.wait(400)
    finally:
        if paused_driver is not None:
            os.kill(paused_driver, signal.SIGCONT)
        tree.kill_all()
    out = proc.log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "while training it; waiting for its new holder" in out
    assert Path(registry.set_in_use(key).uri()) == in_use and in_use.name == "gen-00000002"
    for file, data in published.items():  # later files are students' target caches only
        assert file.read_bytes() == data, file
    assert all(
        "targets" in p.relative_to(in_use).parts for p in in_use.rglob("*") if p.is_file() and p not in published
    )
    stale = Path(registry.output(key, 1).uri())
    assert (stale / "epoch_2" / "manifest.json").is_file()  # the woken holder wrote, but only at home
    summary = json.loads((tmp_path / "results" / "sweeps" / "paused" / "summary.json").read_text())
    assert [r["state"] for r in summary["trials"]] == ["TERMINATED", "TERMINATED"]
    assert summary["teacher_trainings_performed"] == 1
    # the second holder trained it, the first reused it (which trial took the lease first is not fixed)
    assert sorted(r["teacher_trained"] for r in summary["trials"]) == [False, True]


def _published_by(registry: TeacherRegistry, key: str, generation: int) -> bool:
    in_use = registry.set_in_use(key)
    return in_use is not None and in_use.uri() == registry.output(key, generation).uri()


def test_trials_released_at_once_by_a_stored_teacher_wait_for_a_run_slot_not_in_rays_queue(tmp_path):
    """Three trials, two slots: two share a teacher (one trains it, one waits for it without a
    slot) and the third trains another. The shared teacher is stored while both Train runs are
    held: the waiting trial must queue for a run slot in the trial (holding nothing), not start
    a third Train run whose workers Ray would queue against `worker_start_timeout_s`. It runs
    once the trial holding its teacher's run has finished. (Before run slots existed, it called
    fit() at once.)"""
    shared = {**LEARNING_POINT, "rho": 0.05, "teacher_epoch": 2}
    other = {**LEARNING_POINT, "rho": 0.0, "teacher_epoch": 4}
    points = [shared, {**shared, "teacher_epoch": 4}, other]
    path = _spec(tmp_path, "crowd", points_to_evaluate=points, num_samples=3, max_concurrent_trials=2)
    spec = yaml.safe_load(path.read_text())
    spec["student"]["epochs"] = 2
    # a third run's workers would fit beside two (2 CPUs): without the gate it would start
    spec["sweep"]["resources"].update({"teacher": {"num_workers": 1, "cpus_per_worker": 0.5}})
    spec["sweep"]["resources"].update({"student": {"num_workers": 1, "cpus_per_worker": 0.5}})
    path.write_text(yaml.safe_dump(spec))
    sized = SweepSpec.model_validate(spec)
    shared_key, other_key = (sized.run_spec(point).teacher_key(1) for point in (shared, other))
    holds = tmp_path / "holds"
    holds.mkdir()
    # the shared teacher held at its first epoch until the other teacher's run has its slot (and is
    # held after its first epoch); then the shared teacher's run is held at its first student epoch
    hold_at = f"teacher-checked:1@{shared_key},teacher:1@{other_key},student:1"
    env = {**remem_env(tmp_path), "REMEM_TEST_HOLD_AT": hold_at, "REMEM_TEST_HOLD_DIR": str(holds)}
    proc, tree = start_remem(["sweep", "run", str(path)], tmp_path, env)
    try:
        _wait_until(lambda: _claimed(holds, "teacher-checked:1") is not None, proc, 300, "the shared teacher's run")
        _wait_until(lambda: _claimed(holds, "teacher:1") is not None, proc, 300, "the other teacher's run")
        (holds / "teacher-checked-1.release").touch()
        _wait_until(lambda: _claimed(holds, "student:1") is not None, proc, 300, "the shared teacher's student")
        waiting = "waiting for a Train run slot (2 of 2 running, 0 ahead)"
        _wait_until(lambda: waiting in proc.log_path.read_text(), proc, 120, "the third trial to queue")
        released_at = time.time()
        (holds / "student-1.release").touch()
        (holds / "teacher-1.release").touch()
        proc.wait(400)
    finally:
        tree.kill_all()
    out = proc.log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "crowd"
    summary = json.loads((experiment / "summary.json").read_text())
    assert [r["state"] for r in summary["trials"]] == ["TERMINATED"] * 3
    assert summary["teacher_trainings_performed"] == 2
    (reuser,) = [r for r in summary["trials"] if not r["teacher_trained"]]
    rows = _rows(experiment, reuser["trial_id"])
    assert len(rows) == 2 and all(row["fit_called_at"] > released_at for row in rows)
