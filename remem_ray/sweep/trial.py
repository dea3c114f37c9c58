"""The Tune trial: a module-level function trainable that drives its Ray Train runs.

1. teacher_key = hash of what determines the teacher run; the registry supplies it if stored,
   else this trial trains it (every candidate epoch saved) while other trials needing the same
   key wait.
2. the student is distilled from the chosen checkpoint and reports each epoch to Tune through
   TuneReportCallback, so ASHA rungs are student epochs.

A trial that trains its teacher runs both in one Train run (remem_ray.train.phases: one start
instead of two) when both phases take the same workers; the teacher's resume state lives in its
lease generation's folder in the registry, so whoever holds the key's lease next continues from
it. Student runs are named after the trial, so a restarted trial resumes its student from the
last reported checkpoint.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import uuid
from typing import Any

from remem_ray.checkpoint_files import best_checkpoint, checkpoint_name
from remem_ray.config import SweepSpec, WorkerResources
from remem_ray.console import say
from remem_ray.contract import (
    EPOCH,
    EPOCHS,
    STUDENT_KEY,
    STUDENT_REPLAYED,
    TEACHER_KEY,
    TEACHER_TRAINED,
    LoopConfig,
    PhasesConfig,
)
from remem_ray.errors import RecordedDivergence, ResourceError, TrainingDivergedError
from remem_ray.faultpoints import hold_if_asked
from remem_ray.leases import HEARTBEAT_S, Heartbeat, Lease, LeaseHandle, LeaseWatch, process_gone
from remem_ray.process import peak_rss_mb
from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.ray_adapter import trial_stopping_event
from remem_ray.sweep.registry import POLL_S, STALE_AFTER_S, TeacherInUse, TeacherRegistry, Waiter
from remem_ray.sweep.run_slots import run_slot
from remem_ray.sweep.students import (
    StudentFinished,
    StudentRecord,
    StudentRegistry,
    distil_once,
    key_held,
    replay,
    replay_extra,
    usable_record,
)
from remem_ray.teacher_layout import RESUME_DIR, TRAIN_RUN

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller


def scaling_config(resources: WorkerResources):
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.gpus() > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus()},
    )


def make_trainer(
    loop,
    loop_config: LoopConfig | PhasesConfig,
    resources: WorkerResources,
    backend: str,
    run_config,
    start_timeout_s: float,
):
    """A TorchTrainer (DDP process group) for several workers; one worker needs no process group.
    The loop gets its config as plain data (remem_ray.contract says why).

    A single worker runs under the plain data-parallel trainer with a no-op backend: no
    torch.distributed rendezvous, so no TCP store listening on every interface.
    backend: "auto" lets Ray pick (nccl with GPUs); "gloo" suits logical GPUs and CPUs.
    """
    from ray.train.backend import BackendConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    common = dict(
        train_loop_config=loop_config.to_dict(), scaling_config=scaling_config(resources), run_config=run_config
    )
    # Train passes this variable on from its driver (this trial) to the run's controller
    os.environ[WORKER_START_TIMEOUT_ENV] = str(start_timeout_s)
    if resources.num_workers == 1:
        return DataParallelTrainer(loop, backend_config=BackendConfig(), **common)
    from ray.train.torch import TorchConfig, TorchTrainer  # imports torch: only where a process group is needed

    torch_config = TorchConfig() if backend == "auto" else TorchConfig(backend=backend)
    return TorchTrainer(loop, torch_config=torch_config, **common)


def teach_then_distil_in_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Train loop of a trial that trains its teacher. The training code (torch, timm) is
    imported here, in the Train worker: never in the trial's driver, nor in Train's controller,
    which unpickle this function by reference."""
    from remem_ray.train.phases import teach_then_distil

    return _ended_by_a_recorded_divergence(teach_then_distil, PhasesConfig.from_dict(config))


def distill_student_in_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Train loop of a student on a stored teacher; imports as teach_then_distil_in_worker."""
    from remem_ray.train.student import distill_student

    return _ended_by_a_recorded_divergence(distill_student, LoopConfig.from_dict(config))


def _ended_by_a_recorded_divergence(loop, config) -> dict[str, Any]:
    """A divergence kept for its key ends the run without an error: Train would retry a failed run
    (each retry booting its workers, on a GPU node, to meet the record at once); the trial's driver
    finds the record once the run has ended, and fails the trial with it (TrialRuns._fit)."""
    try:
        return loop(config)
    except RecordedDivergence as exc:
        return {"diverged": str(exc)}


def train_run_config(name: str, storage: Storage, max_failures: int, trial_id: str, callbacks=None):
    import ray.train

    from remem_ray.sweep.train_callbacks import NamesItsTrial

    every: list[Any] = [NamesItsTrial(trial_id), *(callbacks or [])]
    # Train checkpoints only serve resumption (kept models live in the registry and students/),
    # so two per run bound storage: a ViT-B teacher's state with momentum is about 0.7 GB.
    return ray.train.RunConfig(
        name=name,
        storage_path=storage.path(),
        storage_filesystem=storage.fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=every,
    )


def _usable(
    registry: TeacherRegistry, key: str, older_keys: list[str], epochs: list[int], epoch: int, corrupt: set[str]
) -> bool:
    """Whether the key's set in use has every candidate and the one used whole. A set found corrupt
    (its sha256 check reads the whole checkpoint) goes into `corrupt` and is not read again: a
    published set is never rewritten, and waiters poll every few seconds while it is retrained."""
    in_use = registry.set_in_use(key, older_keys)
    if in_use is None or in_use.uri() in corrupt or in_use.missing(epochs):
        return False
    if in_use.verify(epoch) is None:
        return True
    corrupt.add(in_use.uri())
    return False


class TeacherFinished:
    """Run by the teacher run's rank 0 when its teacher phase ends (before any student phase):
    its generation's folder becomes the set in use, and this sweep records which trial trained
    the key, so a trial restarted in its student phase knows it trained the teacher. Nothing
    happens if the lease has passed on meanwhile: the registry refuses a holder whose
    generation a newer one has claimed, and the new holder publishes its own."""

    def __init__(
        self, registry: TeacherRegistry, layout: SweepLayout, key: str, trial_id: str, lease: LeaseHandle | None
    ):
        self.registry, self.layout, self.key, self.trial_id, self.lease = registry, layout, key, trial_id, lease
        self.token = uuid.uuid4().hex  # tells this training's record from an older one of the same trial
        self.fit_called_at = time.time()

    def __call__(self) -> bool:
        """True if this training's folder became the set in use."""
        holder = f"{self.layout.name}/{self.trial_id}"
        if self.lease is None or LeaseWatch(self.lease).lost() is not None:
            return False
        if not self.registry.publish(self.key, self.lease.generation, by=holder):
            return False
        # the pointer names this trial now; a run ended before the record below is told by it (`trained_here`)
        self.layout.record_teacher_training(self.key, self.trial_id, fit_called_at=self.fit_called_at, token=self.token)
        return True

    def diverged(self, message: str) -> str | None:
        """Its training diverged (rank 0): kept for the key, so none trains it again. Not by a
        holder whose lease has passed on (None: the error stays its run's own): the new holder
        trains on, and a record would fail every waiter of the key, and that holder, with it."""
        if self.lease is not None and LeaseWatch(self.lease).lost() is not None:
            return None
        return self.registry.record_divergence(self.key, message)

    def divergence(self) -> str | None:
        return self.registry.divergence(self.key)

    def done(self) -> bool:
        """Whether this very training marked the teacher finished."""
        record = self.layout.teacher_training(self.key)
        return record is not None and record.get("token") == self.token


def trained_here(registry: TeacherRegistry, layout: SweepLayout, key: str, holder: str) -> bool:
    """Whether the trial `holder` (sweep/trial) trained the key's set in use: this sweep's record
    says so, or the pointer does (its run published the set and ended before writing the record,
    which is written now: the sweep's count of trainings would miss it, and the trial show "reused")."""
    trial_id = holder.rsplit("/", 1)[-1]
    if layout.trained_by(key) == trial_id:
        return True
    if registry.published_by(key) != holder:
        return False
    # never over a record of a retraining that another trial published since
    if layout.record_teacher_training(key, trial_id, only_if_none=True, recorded_late=True, fit_called_at=None):
        return True
    return layout.trained_by(key) == trial_id


def ensure_teacher(
    spec: SweepSpec,
    run_spec,
    holder: str,
    registry: TeacherRegistry,
    layout: SweepLayout,
    fit,
    stale_after_s: float = STALE_AFTER_S,
    stopping: threading.Event | None = None,
) -> bool:
    """Make sure every candidate checkpoint of this teacher is stored and the one this trial uses
    is whole (sha256 against its manifest); True if this trial trained it.

    `holder` names this trial across sweeps (sweep/trial id). Whoever holds the key's lease
    trains, calling `fit(spec, run_spec, registry, key, handle, finished, resume_from)`, which
    calls `finished()` (a TeacherFinished) once the teacher is whole; `resume_from` is an earlier
    holder's folder to continue from, or None. A holder that loses its lease mid-run (declared
    stale) stops at the next epoch and waits like the others. A set in use with a checkpoint
    missing, unfinished, corrupt or truncated is never used: the trial holding the lease logs
    it, records it for summary.json and trains the teacher again beside it.
    """
    key = run_spec.teacher_key(spec.sweep.resources.teacher.num_workers)
    older_keys = run_spec.legacy_teacher_keys(spec.sweep.resources.teacher.num_workers)
    epochs, epoch = run_spec.teacher.saved_epochs, run_spec.student.teacher_epoch
    trial_id = holder.rsplit("/", 1)[-1]
    lease = registry.lease(key, holder, stale_after_s)
    waiting_for = f"teacher {key}"
    waiter = Waiter(waiting_for, spec.sweep.teacher_wait_timeout_s, POLL_S)
    held: Waiter | None = None  # rides out the looks under the lease: its own outage clock and deadline
    corrupt: set[str] = set()
    while True:
        try:
            if _usable(registry, key, older_keys, epochs, epoch, corrupt):
                # Stored already; still ours if this very trial trained it before Tune restarted it.
                return trained_here(registry, layout, key, holder)
            diverged = registry.divergence(key)
            if diverged is not None:  # its settings and seed diverge: no Train run to find it again
                raise TrainingDivergedError(diverged)
            taken = lease.try_acquire(gone=process_gone)  # a holder whose process ended: at once
        except ResourceError as exc:  # an outage: the holder rides it out, and so do its waiters
            waiter.ride_out(exc, stale_after_s)
            continue
        waiter.answered()
        if taken:
            fitting = _Fitting()
            try:
                trained = _train_under_lease(
                    spec, run_spec, trial_id, registry, layout, key, older_keys, lease, fit, fitting, stopping
                )
            except ResourceError as exc:
                if fitting.now:  # the Train run's own: Tune's retry of the trial decides
                    raise
                # a look before or after the run (claim, checks, the finished record: the teacher may
                # be published already), ridden out as the looks before the lease are, on a clock of
                # its own: the looks before answer, and a long run is not a wait for a teacher
                held = held or Waiter(waiting_for, spec.sweep.teacher_wait_timeout_s, POLL_S)
                held.ride_out(exc, stale_after_s)
                continue
            held = None
            if trained is not None:
                return trained
            # lost the lease mid-run: the new holder finishes; wait for it as long as for any
            # holder (its training, not the time this trial spent training, is what is waited for)
            waiter = Waiter(waiting_for, spec.sweep.teacher_wait_timeout_s, POLL_S)
            continue
        waiter.wait(lambda: f"trial {trial_id}: waiting for teacher {key[:8]} (trained by {lease.holder_now()})")


class _Fitting:
    """Whether a teacher's Train run is under way (set while `fit` runs, left set if it raises)."""

    def __init__(self) -> None:
        self.now = False


def _train_under_lease(
    spec: SweepSpec,
    run_spec,
    trial_id: str,
    registry: TeacherRegistry,
    layout: SweepLayout,
    key: str,
    older_keys: list[str],
    lease: Lease,
    fit,
    fitting: _Fitting,
    stopping: threading.Event | None = None,
) -> bool | None:
    """Train the teacher while holding its lease: True if this trial trained it, False if the
    set in use turned out whole (trained by another), None if the lease was lost on the way."""
    epochs, epoch = run_spec.teacher.saved_epochs, run_spec.student.teacher_epoch
    heartbeat = Heartbeat(lease, HEARTBEAT_S, stopping)
    try:
        with heartbeat:
            handle = lease.handle()
            if not registry.claim(key, handle.generation):  # from here no older holder changes the set in use
                say(f"trial {trial_id}: lost the lease on teacher {key[:8]} as it took it; waiting for its new holder")
                return None
            hold_if_asked("holder", handle.generation, layout.experiment.uri())
            in_use = registry.set_in_use(key, older_keys)
            resume_from = registry.resume_source(key, handle.generation)
            if in_use is not None:
                problem = in_use.problem(epochs, epoch)
                if problem is None:  # finished by another holder while we waited (or a check that failed once)
                    return trained_here(registry, layout, key, f"{layout.name}/{trial_id}")
                into = registry.output(key, handle.generation).uri()
                if not layout.integrity_event_recorded(key, in_use.uri()):  # once per broken set
                    layout.record_integrity_event(key, epoch, problem, trial_id, f"retrained into {into}", in_use.uri())
                # beside the set in use; resumed only where an earlier retraining's checkpoints are whole
                say(f"trial {trial_id}: {problem}; training teacher {key[:8]} again into {into}")
            teacher = run_spec.teacher
            resuming = f", resuming {resume_from.uri()}" if resume_from is not None else ""
            say(f"trial {trial_id}: training teacher {key[:8]} (rho {teacher.rho}, alpha {teacher.alpha}{resuming})")
            finished = TeacherFinished(registry, layout, key, trial_id, handle)
            fitting.now = True
            fit(spec, run_spec, registry, key, handle, finished, resume_from)
            fitting.now = False
        if finished.done():  # its run marked the teacher finished
            return True
        diverged = registry.divergence(key)  # its run ended without an error: _ended_by_a_recorded_divergence
        if diverged is not None:
            raise TrainingDivergedError(diverged)
        say(f"trial {trial_id}: lost the lease on teacher {key[:8]} while training it; waiting for its new holder")
        return None
    finally:
        lease.release()


class TrialRuns:
    """The Train runs of one trial. Training its teacher, it distils in the same run when both
    phases take the same workers (`distilled` is then set); otherwise, and on a stored teacher,
    the student has a run of its own."""

    def __init__(self, spec: SweepSpec, run_spec, trial_id: str, started_at: float) -> None:
        self.spec, self.run_spec, self.trial_id, self.started_at = spec, run_spec, trial_id, started_at
        self.layout = SweepLayout.of(spec)
        self.registry = TeacherRegistry(self.layout.teachers)
        self.key, self.student_key = spec.trial_keys(run_spec)
        self.students = StudentRegistry(self.layout.students)
        self.finished: StudentFinished | None = None  # stores the student for reuse once distilled
        self.stopping = trial_stopping_event()  # set when Tune stops this trial: its leases go at once
        self.distilled = False
        self.student_lease: LeaseHandle | None = None  # the student key's, where this trial holds it

    def distil(self, holder: str, finished: StudentFinished | None = None, lease: LeaseHandle | None = None) -> None:
        """Distil this trial's student (training its teacher first where needed), the finished
        student stored for reuse by `finished`; its run's writes fenced by the student key's
        `lease` (a copy of this trial paused past the stale window stops before its next save)."""
        self.finished, self.student_lease = finished, lease
        trained = ensure_teacher(
            self.spec,
            self.run_spec,
            holder,
            self.registry,
            self.layout,
            fit=self.fit_teacher,
            stale_after_s=self.spec.sweep.lease_stale_after_s,
            stopping=self.stopping,
        )
        if not trained:  # the console shows a training, not a reuse: say where the teacher came from
            try:
                by = self.layout.trained_by(self.key)
                source = f"trial {by}" if by else (self.registry.published_by(self.key) or "an earlier version")
            except (ResourceError, ValueError, KeyError):  # a line for the console must not fail the trial
                source = "a run whose record did not read"
            epoch = self.run_spec.student.teacher_epoch
            stored = f"teacher {self.key[:8]} is stored (trained by {source})"
            say(f"trial {self.trial_id}: {stored}; distilling from epoch {epoch}")
        if not self.distilled:
            self.fit_student(trained)

    def replay(self, record: StudentRecord) -> None:
        from ray import tune

        say(
            f"trial {self.trial_id}: student {self.student_key[:8]} was distilled by {record.made_by}; "
            f"replaying its {len(record.history)} epochs"
        )
        extra = replay_extra(self.key, self.student_key)
        replay(record, self.layout.student(self.trial_id), tune.report, extra)

    def student_run_exists(self) -> bool:
        return self.layout.train_runs.exists(f"student-{self.trial_id}")

    def _student_run(self):
        from ray.tune.integration.ray_train import TuneReportCallback

        return train_run_config(
            f"student-{self.trial_id}",
            self.layout.train_runs,
            self.spec.sweep.max_failures,
            self.trial_id,
            [TuneReportCallback()],
        )

    def _student_config(self, teacher_checkpoint: str, trained: bool) -> LoopConfig:
        epoch = self.run_spec.student.teacher_epoch
        assert epoch is not None  # SweepSpec.run_spec sets the trial's choice
        older_keys = tuple(self.run_spec.legacy_teacher_keys(self.spec.sweep.resources.teacher.num_workers))
        return LoopConfig(
            self.run_spec,
            self.layout.student(self.trial_id).uri(),
            on_finished=pickle.dumps(self.finished) if self.finished is not None else None,
            teacher_now=pickle.dumps(TeacherInUse(self.registry, self.key, older_keys, epoch)),
            teacher_checkpoint=teacher_checkpoint,
            lease=self.student_lease,
            label=f"trial {self.trial_id} student",
            lease_stale_after_s=self.spec.sweep.lease_stale_after_s,
            wait_limit_s=self.spec.sweep.teacher_wait_timeout_s,
            tensorboard=self.layout.tensorboard(f"trial_{self.trial_id}_student").uri(),
            report_extra={
                TEACHER_KEY: self.key,
                TEACHER_TRAINED: int(trained),
                STUDENT_KEY: self.student_key,
                STUDENT_REPLAYED: 0,
                # timings and memory of this trial's driver, for benchmarks/sweep_overhead.py
                "trial_started_at": self.started_at,
                "fit_called_at": time.time(),
                "trial_driver_rss_mb": peak_rss_mb(),
            },
        )

    def fit_teacher(
        self, spec, run_spec, registry: TeacherRegistry, key: str, handle: LeaseHandle, finished, resume_from=None
    ) -> None:
        """Train (or resume) the teacher under a held lease, into its generation's folder, and its
        student in the same run when the workers match; the loop stops if the lease goes."""
        resources = spec.sweep.resources
        # A trial restarted with a student run of its own already (its teacher found corrupt
        # since, say) keeps that run for its student: a run with a checkpoint skips its teacher phase.
        together = resources.one_run_for_both_phases() and not self.student_run_exists()
        output = registry.output(key, handle.generation)
        epoch = run_spec.student.teacher_epoch
        teacher = LoopConfig(
            run_spec,
            output.uri(),
            state=output.uri(RESUME_DIR),
            resume_from=resume_from.uri() if resume_from is not None else None,
            lease=handle,
            label=f"trial {self.trial_id} teacher {key[:8]}",
            tensorboard=self.layout.tensorboard(f"teacher_{key}").uri(),
        )
        if together:
            run = self._student_run()
        else:  # a teacher-only run: the student takes other workers
            run = train_run_config(TRAIN_RUN, output, spec.sweep.max_failures, self.trial_id)
        with self._run_slot("teacher"):  # a run that also distils takes the teacher's workers
            finished.fit_called_at = time.time()  # the run's start, for benchmarks/sweep_overhead.py
            student = self._student_config(output.uri(checkpoint_name(epoch)), True) if together else None
            # pickled: Train's controller unpickles the config, and importing this module would cost
            # every teacher's start seconds
            config = PhasesConfig(teacher, student, on_teacher_done=pickle.dumps(finished))
            result = self._fit(teach_then_distil_in_worker, config, resources.teacher, run)
        # its teacher published, the student phase ended short of its last epoch: it diverged (the
        # run ended without an error: _ended_by_a_recorded_divergence); a teacher that diverged is
        # found where the trial waits for its teacher (_train_under_lease)
        self.distilled = together and finished.done() and self._student_finished(result)

    def fit_student(self, trained: bool) -> None:
        """Distil from the stored teacher in a run of its own (resumed if the trial restarted)."""
        epoch = self.run_spec.student.teacher_epoch
        assert epoch is not None  # SweepSpec.run_spec sets the trial's choice
        world_size = self.spec.sweep.resources.teacher.num_workers
        in_use = self.registry.set_in_use(self.key, self.run_spec.legacy_teacher_keys(world_size))
        assert in_use is not None  # ensure_teacher made sure of it
        run = self._student_run()
        with self._run_slot("student"):
            config = self._student_config(in_use.checkpoint_uri(epoch), trained)
            result = self._fit(distill_student_in_worker, config, self.spec.sweep.resources.student, run)
        self._student_finished(result)

    def _run_slot(self, role: str):
        """Held around each Train run, from before its config is built (`fit_called_at` then
        counts from the end of the wait): sweep/run_slots.py says why."""
        return run_slot(self.spec, self.trial_id, role, self.spec.sweep.teacher_wait_timeout_s, self.stopping)

    def _fit(self, loop, config: LoopConfig | PhasesConfig, resources: WorkerResources, run):
        sweep = self.spec.sweep
        return make_trainer(loop, config, resources, sweep.resources.backend, run, sweep.worker_start_timeout_s).fit()

    def _student_finished(self, result) -> bool:
        """Whether a run's student reached its last epoch; one that ended short of it, without an
        error, met its key's divergence record (_ended_by_a_recorded_divergence): the trial fails
        with it. A run whose teacher phase did not publish reports no student epoch: False."""
        metrics = getattr(result, "metrics", None) or {}
        if EPOCH in metrics and metrics[EPOCH] == metrics.get(EPOCHS):
            return True
        diverged = self.students.divergence(self.student_key)
        if diverged is not None:
            raise TrainingDivergedError(diverged)
        if self.student_lease is not None:
            # the run stopped before a save: its lease had passed on, or storage did not answer for
            # the stale window. An error, never a finished trial with a student short of its
            # epochs: Tune's retry looks again (it waits for the key's holder, then replays its
            # student or goes on with its own run)
            lost = LeaseWatch(self.student_lease).lost()
            why = f"its lease on the key passed on ({lost})" if lost else "storage did not answer for the stale window"
            raise RuntimeError(
                f"trial {self.trial_id}: the run distilling student {self.student_key[:8]} stopped before its last "
                f"epoch: {why}"
            )
        return False


def remem_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable; `sweep` (the SweepSpec as a dict) arrives via tune.with_parameters."""
    from ray import tune

    started_at = time.time()
    spec = SweepSpec.model_validate(sweep)
    run_spec = spec.run_spec(config)
    trial_id = tune.get_context().get_trial_id()
    runs = TrialRuns(spec, run_spec, trial_id, started_at)
    holder = f"{spec.name}/{trial_id}"
    if runs.student_run_exists():  # restarted: it goes on with its own run, never replays beside it
        record, seen = usable_record(runs.students, runs.student_key, trial_id)
        diverged = runs.students.divergence(runs.student_key) if record is None else None
        if diverged is not None:  # seeded: its run would only diverge again
            raise TrainingDivergedError(diverged)
        store = StudentFinished(runs.students, runs.student_key, seen, holder) if record is None else None
        wait_s, stale_s = spec.sweep.teacher_wait_timeout_s, spec.sweep.lease_stale_after_s
        with key_held(runs.students, runs.student_key, holder, wait_s, stale_s, runs.stopping) as lease:
            runs.distil(holder, store, lease)
    else:
        timeout = spec.sweep.teacher_wait_timeout_s
        distil_once(
            runs.students,
            runs.student_key,
            holder,
            lambda finished, lease: runs.distil(holder, finished, lease),
            runs.replay,
            timeout,
            stale_after_s=spec.sweep.lease_stale_after_s,
            stopping=runs.stopping,
        )
    try:  # a line for the log: the student is stored, and a storage blip must not fail the trial now
        where = f"student at {best_checkpoint(runs.layout.student(trial_id))}"
    except ResourceError as exc:
        where = f"its student's path not read ({exc})"
    print(f"trial {trial_id}: done; {where}", flush=True)  # log


def trial_dirname(trial) -> str:
    """Tune's trial_dirname_creator: SweepLayout's name for the trial's folder."""
    return SweepLayout.trial_dirname(trial.trial_id)
