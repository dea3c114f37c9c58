"""A trial's own logic (remem_ray.sweep.trial) with Ray Train stood in for: which runs it starts,
and how its teacher training is marked finished. The real runs are in tests/test_faults.py."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest
from helpers.teachers import registry_setup, write_teacher

from remem_ray.config import WorkerResources
from remem_ray.contract import LoopConfig, PhasesConfig
from remem_ray.leases import Lease
from remem_ray.sweep import trial as trial_module
from remem_ray.sweep.trial import TeacherFinished, TrialRuns


class Recorder:
    """Stands in for make_trainer: records each run's loop function and config; fit() trains
    nothing and returns a result whose last report is `last` (default: a student's last epoch)."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, dict]] = []
        self.last: dict = {"epoch": 3, "epochs": 3}

    def __call__(self, loop, config, resources, backend, run_config, start_timeout_s):
        self.runs.append((loop.__name__, config))
        return self

    def fit(self):
        return SimpleNamespace(metrics=self.last)


def _runs(tmp_path, monkeypatch):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    recorder = Recorder()
    monkeypatch.setattr(trial_module, "make_trainer", recorder)
    monkeypatch.setattr(trial_module, "train_run_config", lambda *args, **kwargs: None)
    monkeypatch.setattr(TrialRuns, "_student_run", lambda self: None)
    runs = TrialRuns(spec, run_spec, "t1", 0.0)
    lease = Lease(registry.folder(key).lease, "s/t1", 60)
    assert lease.try_acquire()
    return spec, run_spec, layout, registry, key, lease, runs, recorder


def test_a_trial_training_its_teacher_distils_in_the_same_run(tmp_path, monkeypatch):
    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    finished = TeacherFinished(registry, layout, key, "t1", lease.handle())
    runs.fit_teacher(spec, run_spec, registry, key, lease.handle(), finished)
    ((loop, config),) = recorder.runs
    output = registry.output(key, lease.handle().generation)  # the lease generation's own folder
    assert loop == "teach_then_distil_in_worker" and config.student.teacher_checkpoint == output.uri("epoch_4")
    assert config.teacher.output == output.uri() and config.teacher.state == output.uri("resume")
    assert isinstance(config.to_dict()["on_teacher_done"], bytes)  # plain data for Train's controller
    assert PhasesConfig.from_dict(config.to_dict()) == config
    assert not runs.distilled  # the stand-in run never marked the teacher finished
    pickle.loads(config.on_teacher_done)()  # what the run's rank 0 does between the phases
    runs.fit_teacher(spec, run_spec, registry, key, lease.handle(), finished)
    assert runs.distilled


def test_a_student_run_waits_on_teacher_targets_by_the_sweeps_lease_settings(tmp_path, monkeypatch):
    """The targets lease of a student run used the 60 s default window and a fixed 6 h limit,
    whatever the sweep's `lease_stale_after_s` and `teacher_wait_timeout_s` said."""
    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    sweep = spec.sweep.model_copy(update={"lease_stale_after_s": 15.0, "teacher_wait_timeout_s": 600.0})
    runs.spec = spec.model_copy(update={"sweep": sweep})
    finished = TeacherFinished(registry, layout, key, "t1", lease.handle())
    runs.fit_teacher(runs.spec, run_spec, registry, key, lease.handle(), finished)
    ((_, config),) = recorder.runs
    student = PhasesConfig.from_dict(config.to_dict()).student  # as the Train worker sees it
    assert (student.lease_stale_after_s, student.wait_limit_s) == (15.0, 600.0)


def test_a_trial_with_a_student_run_already_trains_its_teacher_in_a_run_of_its_own(tmp_path, monkeypatch):
    """A restarted trial whose teacher turned out corrupt: its student run has a checkpoint, and
    such a run skips its teacher phase, so the retraining must not go there."""
    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    layout.train_runs.write_text("student-t1/checkpoint_manager_snapshot.json", "{}")
    finished = TeacherFinished(registry, layout, key, "t1", lease.handle())
    runs.fit_teacher(spec, run_spec, registry, key, lease.handle(), finished)
    ((loop, config),) = recorder.runs
    assert loop == "teach_then_distil_in_worker" and config.student is None
    pickle.loads(config.on_teacher_done)()
    assert not runs.distilled
    runs.fit_student(trained=True)
    assert recorder.runs[-1][0] == "distill_student_in_worker"


def test_an_older_record_of_the_same_trial_is_not_this_training_finished(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    layout.record_teacher_training(key, "t1")  # this trial trained the key once, before a restart
    lease = Lease(registry.folder(key).lease, "s/t1", 60)
    assert lease.try_acquire()
    finished = TeacherFinished(registry, layout, key, "t1", lease.handle())
    assert not finished.done()
    finished()
    assert finished.done() and layout.trained_by(key) == "t1"


def test_a_holder_that_lost_its_lease_neither_publishes_nor_records(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    clock = [0.0]
    first = Lease(registry.folder(key).lease, "s/t1", 1.0, clock=lambda: clock[0])
    assert first.try_acquire() and registry.claim(key, 1)
    write_teacher(registry.output(key, 1), 1.0)
    finished = TeacherFinished(registry, layout, key, "t1", first.handle())
    other = Lease(registry.folder(key).lease, "s/t2", 1.0, clock=lambda: clock[0])
    assert not other.try_acquire()
    clock[0] = 5.0
    assert other.try_acquire()  # the first holder looked stale
    finished()
    assert registry.set_in_use(key) is None and layout.trained_by(key) is None
    # nor records its divergence: bf16 kernels are not bit-deterministic, so the new holder,
    # resumed from the same epoch, may train on where this one diverged
    assert finished.diverged("teacher diverged in epoch 3 (train_loss nan)") is None
    assert registry.divergence(key) is None


def test_a_train_run_waits_for_slow_workers_as_long_as_the_sweep_says(tmp_path, monkeypatch):
    """Ray Train's own default (60 s) failed the trials of a loaded 2-core machine: the sweep's
    `worker_start_timeout_s` reaches each run's controller through its driver's environment."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    monkeypatch.delenv(trial_module.WORKER_START_TIMEOUT_ENV, raising=False)
    assert spec.sweep.worker_start_timeout_s == 600  # generous by default
    run_config = trial_module.train_run_config("r", layout.train_runs, 0, "t1")
    config = LoopConfig(run_spec, str(tmp_path / "out"))
    trial_module.make_trainer(
        trial_module.distill_student_in_worker, config, WorkerResources(), "auto", run_config, 321
    )
    assert os.environ[trial_module.WORKER_START_TIMEOUT_ENV] == "321"
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert trial_module.WORKER_START_TIMEOUT_ENV in ENV_VARS_TO_PROPAGATE  # Train passes it on


def test_a_recorded_divergence_ends_a_sweeps_train_run_without_an_error():
    """Train retries a run that raised (max_failures times), each retry booting its workers only
    to meet the divergence's record at once: a recorded one ends the run, and the trial's driver
    fails the trial from the record (TrialRuns._fit). One not recorded still fails the run."""
    from remem_ray.errors import RecordedDivergence, TrainingDivergedError
    from remem_ray.sweep.trial import _ended_by_a_recorded_divergence

    def recorded(config):
        raise RecordedDivergence("student diverged in epoch 1 (recorded in students/k/diverged.json: ...)")

    def not_recorded(config):
        raise TrainingDivergedError("student diverged in epoch 1 (not recorded: Access Denied)")

    ended = _ended_by_a_recorded_divergence(recorded, None)
    assert ended == {"diverged": "student diverged in epoch 1 (recorded in students/k/diverged.json: ...)"}
    with pytest.raises(TrainingDivergedError, match="not recorded"):
        _ended_by_a_recorded_divergence(not_recorded, None)
    assert _ended_by_a_recorded_divergence(lambda config: {"student": config}, 7) == {"student": 7}


def test_a_run_that_ended_short_of_its_students_last_epoch_fails_the_trial_with_the_record(tmp_path, monkeypatch):
    """A sweep's Train run that meets a recorded divergence ends without an error (no retries):
    the trial must then fail with the record, never count its half-trained student as distilled
    (in the teacher's run) or go on as if it had one (in a run of its own)."""
    from remem_ray.errors import TrainingDivergedError

    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    finished = TeacherFinished(registry, layout, key, "t1", lease.handle())
    finished()  # the teacher phase published; then the student phase stopped at epoch 1 of 3
    recorder.last = {"epoch": 1, "epochs": 3}
    runs.fit_teacher(spec, run_spec, registry, key, lease.handle(), finished)
    assert not runs.distilled  # no record to say why: its own student run goes on from its checkpoint
    runs.students.record_divergence(runs.student_key, "student diverged in epoch 2 (val_loss nan)")
    teacher_run = lambda: runs.fit_teacher(spec, run_spec, registry, key, lease.handle(), finished)  # noqa: E731
    for fit in (teacher_run, lambda: runs.fit_student(trained=True)):
        with pytest.raises(TrainingDivergedError, match="student diverged in epoch 2 .*diverged.json"):
            fit()
    assert not runs.distilled
    recorder.last = {"epoch": 3, "epochs": 3}  # a run that reached its end is never failed by a record
    runs.fit_student(trained=True)


def test_a_teacher_run_that_ended_on_its_recorded_divergence_fails_the_trial_not_loses_the_lease(tmp_path):
    """Its run ended without an error and without publishing: before, the trial said it lost the
    lease and waited for a new holder."""
    from remem_ray.errors import TrainingDivergedError
    from remem_ray.sweep.trial import ensure_teacher

    spec, run_spec, layout, registry, key = registry_setup(tmp_path)

    def diverges(spec, run_spec, registry, key, handle, finished, resume_from) -> None:
        registry.record_divergence(key, "teacher diverged in epoch 1 (val_loss nan)")

    with pytest.raises(TrainingDivergedError, match="teacher diverged in epoch 1 .*diverged.json"):
        ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=diverges)
    assert registry.lease(key, "x", 60).holder_now() is None  # released


def test_a_late_record_never_replaces_a_newer_trainings(tmp_path, monkeypatch):
    """A restarted trial writes the record its run did not (the pointer named it as publisher when
    it looked); a retraining another trial published and recorded meanwhile keeps its record."""
    from remem_ray.sweep.trial import trained_here

    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    monkeypatch.setattr(registry, "published_by", lambda key: "s/t1")  # as t1 read it
    layout.record_teacher_training(key, "t2")  # t2's retraining, published and recorded since
    assert not trained_here(registry, layout, key, "s/t1")
    assert layout.trained_by(key) == "t2"


def test_a_restarted_trial_waits_while_another_copy_of_it_still_distils(tmp_path, monkeypatch):
    """A resume restarts the unfinished trials, and the old driver's copies still run where that
    driver was paused past the stale window (a laptop asleep while it drove a cluster). A restarted
    trial with a student run of its own went on with it at once, beside its other copy: two copies
    trained one student folder and one Train run. It now waits for the student key's lease."""
    import threading

    from helpers.leases import lease_held_by_a_live_process
    from ray import tune

    from remem_ray.sweep import students as students_module
    from remem_ray.sweep.registry import Waiter

    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    layout.train_runs.write_text("student-t1/checkpoint_manager_snapshot.json", "{}")  # restarted
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    distilled: list[str] = []
    monkeypatch.setattr(TrialRuns, "distil", lambda self, holder, finished=None, lease=None: distilled.append(holder))
    waiting, look = threading.Event(), Waiter.wait

    def seen_waiting(self, note):
        waiting.set()
        look(self, note)

    monkeypatch.setattr(Waiter, "wait", seen_waiting)
    monkeypatch.setattr(students_module, "POLL_S", 0.05)
    point = {"rho": 0.1, "alpha": 0.9, "teacher_epoch": 4}
    assert spec.run_spec(point).student_key() == runs.student_key
    student_lease = runs.students.lease(runs.student_key, "s/t1", 60).folder
    restarted = threading.Thread(target=trial_module.remem_trial, args=(point, spec.model_dump(mode="json")))
    with lease_held_by_a_live_process(student_lease, "s/t1"):  # the old driver's copy, distilling
        restarted.start()
        assert waiting.wait(60)
        assert distilled == []  # no second run beside it
    restarted.join(60)  # that copy ended: its lease is taken at once (its process is gone)
    assert not restarted.is_alive() and distilled == ["s/t1"]
    # held by another trial (this sweep's or another's, distilling the same student into its own
    # folder): no wait, as before
    with lease_held_by_a_live_process(student_lease, "other-sweep/t9"):
        trial_module.remem_trial(point, spec.model_dump(mode="json"))
    assert distilled == ["s/t1", "s/t1"]


def test_a_student_run_is_fenced_by_its_keys_lease_and_a_lost_one_fails_the_trial(tmp_path, monkeypatch):
    """Two copies of one trial (its driver paused past the stale window, a resume elsewhere) wrote
    one student folder: the student run had no lease to check, so the paused copy, woken, saved
    its epochs over the new one's. It carries the student key's lease now, checked before each
    save; a run that stopped on it fails the trial, whose retry finds the key's new holder."""
    from remem_ray.sweep.students import LEASE_DIR, StudentRegistry

    spec, run_spec, layout, registry, key, lease, runs, recorder = _runs(tmp_path, monkeypatch)
    students = StudentRegistry(layout.students)
    clock = [0.0]
    lease_folder = students.folder(runs.student_key).child(LEASE_DIR)
    student_lease = Lease(lease_folder, "s/t1", 1.0, clock=lambda: clock[0])
    assert student_lease.try_acquire() and registry.claim(key, 1)
    write_teacher(registry.output(key, 1), 1.0)
    assert registry.publish(key, 1, by="t1")
    runs.student_lease = student_lease.handle()  # as distil_once hands it to runs.distil
    recorder.last = {"epoch": 3, "epochs": 3}
    runs.fit_student(trained=False)
    ((_, config),) = recorder.runs
    assert LoopConfig.from_dict(config.to_dict()).lease == student_lease.handle()  # as the worker sees it
    other = Lease(lease_folder, "s/t1-resumed", 1.0, clock=lambda: clock[0])
    assert not other.try_acquire()  # held: staleness counts from when a contender first saw it
    clock[0] = 2.0
    assert other.try_acquire()
    recorder.last = {"epoch": 1, "epochs": 3}  # the run stopped before its second epoch's save
    with pytest.raises(RuntimeError, match="stopped before its last epoch: its lease on the key passed on"):
        runs.fit_student(trained=False)
    # storage did not answer the worker for the stale window, though nobody took the key: the
    # trial ended TERMINATED with a student short of its epochs (a review's finding), not now
    runs.student_lease = other.handle()
    with pytest.raises(RuntimeError, match="stopped before its last epoch: storage did not answer"):
        runs.fit_student(trained=False)
