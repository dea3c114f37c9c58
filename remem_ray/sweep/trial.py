"""The Tune trial: a module-level function trainable that drives two Ray Train runs.

1. teacher_key = hash of what determines the teacher run; the registry supplies it if stored,
   else this trial trains it (one TorchTrainer, every candidate epoch saved) while other trials
   needing the same key wait.
2. a TorchTrainer distils the student from the chosen checkpoint and reports each epoch to
   Tune through TuneReportCallback, so ASHA rungs are student epochs.

Train run names derive from the trial id (students) or the teacher key (teachers), so a
restarted trial resumes its Train run from the last reported checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

from remem_ray.config import SweepSpec, WorkerResources
from remem_ray.console import say
from remem_ray.leases import Lease
from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.registry import Heartbeat, TeacherRegistry
from remem_ray.train.loop import peak_rss_mb

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
POLL_S = 2.0


def scaling_config(resources: WorkerResources):
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
    )


def make_trainer(loop, loop_config: dict[str, Any], resources: WorkerResources, backend: str, run_config):
    """A TorchTrainer (DDP process group) for several workers; one worker needs no process group.

    A single worker runs under the plain data-parallel trainer with a no-op backend: no
    torch.distributed rendezvous, so no TCP store listening on every interface.
    backend: "auto" lets Ray pick (nccl with GPUs); "gloo" suits logical GPUs and CPUs.
    """
    from ray.train.backend import BackendConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    common = dict(train_loop_config=loop_config, scaling_config=scaling_config(resources), run_config=run_config)
    if resources.num_workers == 1:
        return DataParallelTrainer(loop, backend_config=BackendConfig(), **common)
    torch_config = TorchConfig() if backend == "auto" else TorchConfig(backend=backend)
    return TorchTrainer(loop, torch_config=torch_config, **common)


def train_run_config(name: str, storage: Storage, max_failures: int, callbacks=None):
    import ray.train

    # Train checkpoints only serve resumption (kept models live in the registry and students/),
    # so two per run bound storage: a ViT-B teacher's state with momentum is about 0.7 GB.
    return ray.train.RunConfig(
        name=name,
        storage_path=storage.path(),
        storage_filesystem=storage.fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks or [],
    )


def _stored_and_whole(registry: TeacherRegistry, key: str, epochs: list[int], epoch: int) -> bool:
    return registry.has_all(key, epochs) and registry.verify(key, epoch) is None


def fit_teacher(spec: SweepSpec, run_spec, registry: TeacherRegistry, key: str, lease: Lease) -> None:
    """Train (or resume) the teacher under a held lease in its Train run; the loop stops if the lease goes."""
    from remem_ray.train.teacher import fine_tune_teacher

    layout = SweepLayout(Storage.from_config(spec.storage), spec.name)
    trainer = make_trainer(
        fine_tune_teacher,
        {
            "spec": run_spec.model_dump(mode="json"),
            "output": registry.training_output(key).uri(),
            "lease": lease.handle().to_dict(),
            "label": f"trial {lease.holder.rsplit('/', 1)[-1]} teacher {key[:8]}",
            "tensorboard": layout.tensorboard(f"teacher_{key}").uri(),
        },
        spec.sweep.resources.teacher,
        spec.sweep.resources.backend,
        train_run_config(registry.train_run_name(key), registry.folder(key), spec.sweep.max_failures),
    )
    trainer.fit()


def ensure_teacher(
    spec: SweepSpec,
    run_spec,
    holder: str,
    registry: TeacherRegistry,
    layout: SweepLayout,
    fit=fit_teacher,
    stale_after_s: float = STALE_AFTER_S,
) -> bool:
    """Make sure every candidate checkpoint of this teacher is stored and the one this trial uses
    is whole (sha256 against its manifest); True if this trial trained it.

    `holder` names this trial across sweeps (sweep/trial id). Whoever holds the key's lease
    trains; a holder that loses its lease mid-run (declared stale) stops at the next epoch and
    waits like the others. A corrupt or truncated checkpoint is never used: the trial holding
    the lease logs it, records it for summary.json and retrains the teacher beside it.
    """
    key = run_spec.teacher_key(spec.sweep.resources.teacher.num_workers)
    epochs, epoch = run_spec.teacher.saved_epochs, run_spec.student.teacher_epoch
    trial_id = holder.rsplit("/", 1)[-1]
    lease = registry.lease(key, holder, stale_after_s)
    deadline = time.monotonic() + spec.sweep.teacher_wait_timeout_s
    last_note = 0.0
    while True:
        if _stored_and_whole(registry, key, epochs, epoch):
            # Stored already; still ours if this very trial trained it before Tune restarted it.
            return layout.trained_by(key) == trial_id
        if lease.try_acquire():
            if _train_under_lease(spec, run_spec, trial_id, registry, layout, key, lease, fit):
                return True
            continue  # lost the lease mid-run: the new holder finishes; wait for it
        if time.monotonic() - last_note > 30:
            say(f"trial {trial_id}: waiting for teacher {key[:8]} (trained by {lease.holder_now()})")
            last_note = time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"teacher {key}: not ready after {spec.sweep.teacher_wait_timeout_s:.0f} s")
        time.sleep(POLL_S)


def _train_under_lease(
    spec: SweepSpec,
    run_spec,
    trial_id: str,
    registry: TeacherRegistry,
    layout: SweepLayout,
    key: str,
    lease: Lease,
    fit,
) -> bool:
    """Train the teacher while holding its lease; False if the lease was lost on the way."""
    epochs, epoch = run_spec.teacher.saved_epochs, run_spec.student.teacher_epoch
    heartbeat = Heartbeat(lease, HEARTBEAT_S)
    try:
        with heartbeat:
            if registry.pending_retrain(key) is None and registry.has_all(key, epochs):
                problem = registry.verify(key, epoch)
                if problem is None:  # finished by another holder while we waited
                    return layout.trained_by(key) == trial_id
                run = registry.schedule_retrain(key, epoch, problem)
                layout.record_integrity_event(key, epoch, problem, trial_id, action=f"retrained in {run}")
                say(f"trial {trial_id}: {problem}; retraining teacher {key[:8]} in Train run {run}")
            teacher = run_spec.teacher
            say(f"trial {trial_id}: training teacher {key[:8]} (rho {teacher.rho}, alpha {teacher.alpha})")
            fit_called_at = time.time()
            fit(spec, run_spec, registry, key, lease)
        if heartbeat.lost.is_set() or not lease.renew():
            say(f"trial {trial_id}: lost the lease on teacher {key[:8]} while training it; waiting for its new holder")
            return False
        registry.finish_training(key)
        layout.record_teacher_training(key, trial_id, fit_called_at=fit_called_at)
        return True
    finally:
        lease.release()


def remem_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable; `sweep` (the SweepSpec as a dict) arrives via tune.with_parameters."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from remem_ray.train.student import distill_student

    started_at = time.time()
    spec = SweepSpec.model_validate(sweep)
    run_spec = spec.run_spec(config)
    trial_id = tune.get_context().get_trial_id()
    storage = Storage.from_config(spec.storage)
    layout = SweepLayout(storage, spec.name)
    registry = TeacherRegistry(layout.teachers)
    trained = ensure_teacher(spec, run_spec, f"{spec.name}/{trial_id}", registry, layout)
    key = run_spec.teacher_key(spec.sweep.resources.teacher.num_workers)
    epoch = run_spec.student.teacher_epoch
    assert epoch is not None  # SweepSpec.run_spec sets the trial's choice
    teacher = registry.checkpoint_uri(key, epoch)
    trainer = make_trainer(
        distill_student,
        {
            "spec": run_spec.model_dump(mode="json"),
            "teacher": teacher,
            "output": layout.student(trial_id).uri(),
            "label": f"trial {trial_id} student",
            "tensorboard": layout.tensorboard(f"trial_{trial_id}_student").uri(),
            # timings and memory of this trial's driver, for benchmarks/sweep_overhead.py
            "report_extra": {
                "teacher_key": key,
                "teacher_trained": int(trained),
                "trial_started_at": started_at,
                "fit_called_at": time.time(),
                "trial_driver_rss_mb": peak_rss_mb(),
            },
        },
        spec.sweep.resources.student,
        spec.sweep.resources.backend,
        train_run_config(
            f"student-{trial_id}", layout.train_runs, spec.sweep.max_failures, callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()
    print(f"trial {trial_id}: done; student at {layout.student(trial_id).uri('best')}", flush=True)  # log only


def trial_dirname(trial) -> str:
    """Short, constant-free trial folder names (the spec never leaks into paths)."""
    return f"trial_{trial.trial_id}"
