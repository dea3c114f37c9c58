"""What the sweep and `remem run` hand the training loops, and what the loops report back.

- `LoopConfig`: one training loop's settings (teacher fine-tuning or student distillation);
  `PhasesConfig`: a teacher phase, then its student, in one run (remem_ray.train.phases).
- `Session`: where a loop reports to (the console, Ray Train, a stored resume state).
- The report keys others read, the metric the sweep keeps, and the one rule that picks the
  trial whose student is kept.

Torch-free: trial drivers build these and never import torch. A Ray Train run takes them as
plain data (`to_dict`, `from_dict` in the worker): Train's controller unpickles the loop config,
and a class of ours there would make it import our modules at every run's start.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from remem_ray.config import LEASE_STALE_AFTER_S, TEACHER_WAIT_TIMEOUT_S, RunSpec
from remem_ray.leases import LeaseHandle

# ------------------------------------------------------------------ report keys

EPOCH = "epoch"  # the student's (or teacher's) epoch; ASHA's budget and Optuna's step
EPOCHS = "epochs"  # the epochs the run was given: fewer reported means stopped early
BEST_VAL_ACC = "best_val_acc"  # the student's best val accuracy so far
BEST_TEST_ACC = "best_test_acc"  # test accuracy of that same epoch (reported, never used to choose)
TEACHER_VAL_ACC = "teacher_val_acc"
TEACHER_MI = "teacher_mi"  # the teacher checkpoint's mutual information at the reference temperature
TEACHER_KEY = "teacher_key"
TEACHER_TRAINED = "teacher_trained"  # 1 if this trial trained its teacher, 0 if it reused a stored one
STUDENT_KEY = "student_key"
STUDENT_REPLAYED = "student_replayed"  # 1 if this trial replayed a stored student's curve instead of distilling

METRIC = BEST_VAL_ACC  # what the sweep keeps: searcher, scheduler and summary agree on it
MODE = "max"

# where TEACHER_MI is read from a checkpoint's information families (remem_ray.insight.information
# measures them; its module doc says why not the relative estimate)
HEADLINE_MI = ("targets/fixed", "i_xt_upper")


def headline_mi(information: Mapping[str, Mapping[str, Any]]) -> float:
    view, field = HEADLINE_MI
    return float(information[view][field])


def teacher_mi_of(teacher_meta: Mapping[str, Any]) -> float:
    """The teacher checkpoint's headline MI, from the family its meta.json records: the number
    it reported when trained follows the headline of its day (a registry's teachers outlive it)."""
    information = teacher_meta.get("information")
    if information:
        return headline_mi(information)
    return float(teacher_meta.get("metrics", {}).get(TEACHER_MI, float("nan")))


def stopped_early(result: Mapping[str, Any] | None) -> bool:
    """A trial that reported fewer student epochs than it was given was stopped by the scheduler."""
    return result is not None and EPOCHS in result and result.get(EPOCH, 0) < result[EPOCHS]


def _score(result: Mapping[str, Any] | None) -> float | None:
    value = None if result is None else result.get(METRIC)
    if value is None or math.isnan(float(value)):
        return None
    return float(value)


def best_trial(trials: Iterable[tuple[str, str, Mapping[str, Any] | None]], live: bool = False) -> str | None:
    """The id of the trial whose student the sweep keeps, from (trial id, status, last result).

    The best METRIC of an ended trial (TERMINATED: finished or stopped by the scheduler); never an
    errored one (its student's training broke off) nor one still running, whose student may yet
    change or never be saved; `live`: the best so far, running trials included. On a tie a
    finished trial before a stopped one, then the first id.
    """
    scored = sorted(
        (trial_id, score, not stopped_early(result))
        for trial_id, status, result in trials
        if (status != "ERROR" if live else status == "TERMINATED") and (score := _score(result)) is not None
    )
    top = max(scored, key=lambda s: (s[1], s[2]), default=None)
    return None if top is None else top[0]


# ------------------------------------------------------------------ where a loop reports


class Session(Protocol):
    world_rank: int
    local_rank: int
    world_size: int

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None, show: bool = True) -> None:
        """Per-epoch metrics, and the training state to resume from (saved where resumable);
        the epoch's line goes to the console if `show`, else to the log only."""

    def restore_state(self) -> dict[str, Any] | None:
        """The last state reported by an earlier attempt of this run, if any."""

    def log(self, message: str) -> None:
        """A line worth the console: epoch results, resumption, stops."""

    def detail(self, message: str) -> None:
        """A line for the log file only under a sweep (shown in-process)."""


# ------------------------------------------------------------------ loop settings


@dataclass(frozen=True)
class LoopConfig:
    """One training loop's settings. Folders are paths or s3:// URIs under the spec's storage."""

    spec: RunSpec
    output: str  # where the loop writes its checkpoints
    teacher_checkpoint: str | None = None  # a student's teacher; None: spec.student.teacher_checkpoint
    state: str | None = None  # a folder keeping the resume state instead of the session (a shared teacher)
    resume_from: str | None = None  # an earlier run's output to continue from, read only, while `state` is empty
    lease: LeaseHandle | None = None  # the right to write `output` when others may train it too
    label: str | None = None  # console prefix, e.g. "trial 1a2b teacher 8e8b4b34"
    quiet: bool = False
    tensorboard: str | None = None  # folder for per-epoch scalars (rank 0)
    report_extra: Mapping[str, Any] = field(default_factory=dict)  # added to every report
    session: Session | None = None  # in-process callers (tests) bring their own; never sent to Ray
    # run on rank 0 once the last epoch is done, before its report, as hook(output, history, log);
    # kept pickled for a Ray Train run, like PhasesConfig.on_teacher_done
    on_finished: Callable[..., object] | bytes | None = None
    # a student's: () -> where its teacher's checkpoint is now (a registry's set in use can move
    # when a broken set is retrained), asked when the one it was given fails its sha256 check
    teacher_now: Callable[[], str | None] | bytes | None = None
    # the sweep's lease settings, for the leases a loop takes itself (a student's teacher targets)
    lease_stale_after_s: float = LEASE_STALE_AFTER_S
    wait_limit_s: float = TEACHER_WAIT_TIMEOUT_S

    def finished_hook(self) -> Callable[..., object] | None:
        hook = self.on_finished
        return pickle.loads(hook) if isinstance(hook, bytes) else hook

    def teacher_finder(self) -> Callable[[], str | None] | None:
        finder = self.teacher_now
        return pickle.loads(finder) if isinstance(finder, bytes) else finder

    def but(self, **changes: Any) -> LoopConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        if self.session is not None:
            raise ValueError("LoopConfig.session: an in-process session cannot travel to a Ray Train run")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "session"}
        data["spec"] = self.spec.model_dump(mode="json")
        data["lease"] = self.lease.to_dict() if self.lease is not None else None
        data["report_extra"] = dict(self.report_extra)
        for name in ("on_finished", "teacher_now"):  # callables travel pickled
            hook = data[name]
            data[name] = pickle.dumps(hook) if hook is not None and not isinstance(hook, bytes) else hook
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopConfig:
        lease = data.get("lease")
        return cls(
            **{
                **data,
                "spec": RunSpec.model_validate(data["spec"]),
                "lease": LeaseHandle.from_dict(lease) if lease else None,
            }
        )


@dataclass(frozen=True)
class PhasesConfig:
    """A trial's teacher phase, then (unless None) its student phase, in one run.

    `on_teacher_done` runs on rank 0 once the teacher is finished; for a Ray Train run it is
    kept pickled (see the module's docstring).
    """

    teacher: LoopConfig
    student: LoopConfig | None = None
    on_teacher_done: Callable[[], object] | bytes | None = None

    def teacher_done_hook(self) -> Callable[[], object] | None:
        hook = self.on_teacher_done
        return pickle.loads(hook) if isinstance(hook, bytes) else hook

    def to_dict(self) -> dict[str, Any]:
        hook = self.on_teacher_done
        return {
            "teacher": self.teacher.to_dict(),
            "student": self.student.to_dict() if self.student is not None else None,
            "on_teacher_done": pickle.dumps(hook) if hook is not None and not isinstance(hook, bytes) else hook,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhasesConfig:
        student = data.get("student")
        return cls(
            LoopConfig.from_dict(data["teacher"]),
            LoopConfig.from_dict(student) if student is not None else None,
            data.get("on_teacher_done"),
        )


# ------------------------------------------------------------------ what a GPU share is sized from


@dataclass(frozen=True)
class StepMemory:
    """One role's Train run on a device (remem_ray.train.memory_probe), in MiB: the allocator's
    reserved peak over a few training steps and an eval batch, what the run keeps on the device
    beside them (the data pipeline's store, a cached-target table), and the device's size. The
    peak and size are None off CUDA, where there is nothing to size."""

    role: str
    device: str
    peak_mb: float | None
    total_mb: float | None
    resident_mb: float = 0.0
