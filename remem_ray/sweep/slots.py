"""How many trials a sweep runs at once, counted by what holds a GPU slot.

A trial runs one Train run at a time: its teacher's (when it holds the teacher's lease) or its
student's. Trials whose teacher another live trial is training wait, with no Train run and so
no GPU; counting them against the sweep's limit would leave GPUs idle while they wait. So a new
trial may start while

    weight(trials whose teacher is stored)  +  weight(teachers being trained)  +  a student run's weight
        <=  capacity

and, so that a crowd of waiters never floods the cluster once their teacher is stored, while
fewer trials are live than the capacity holds distilling plus those it holds training teachers
(twice max_concurrent_trials, counting runs).

What a run weighs (SlotMeasure): with `gpu_budget` and no `max_concurrent_trials`, the GPUs its
workers keep, against the budget: a sweep of 4-GPU teachers and 1-GPU students on 16 GPUs trains
4 teachers at once, or distils 16 students, not 4 (counted by trials, 12 GPUs idled while the
students distilled). Otherwise one per Train run, against max_concurrent_trials.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from remem_ray.config import SweepSpec

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class SlotMeasure:
    """What the sweep's concurrency limit counts, and what a teacher's and a student's Train run
    weigh in it (a run that trains its teacher and distils takes the teacher's workers)."""

    capacity: float
    teacher: float = 1.0
    student: float = 1.0
    by_gpus: bool = False  # weights are GPUs against gpu_budget; else runs against max_concurrent_trials

    def weight(self, role: str) -> float:
        """A run of `role`; never more than the whole capacity, so every run can start alone."""
        return min(self.teacher if role == "teacher" else self.student, self.capacity)

    def most_trials(self) -> int:
        """Trials that fit when every one runs its lighter phase."""
        return whole(self.capacity / min(self.weight(role) for role in ROLES))

    def fewest_trials(self) -> int:
        """Trials that fit when every one runs its heavier phase."""
        return max(1, whole(self.capacity / max(self.weight(role) for role in ROLES)))

    def describe(self) -> str:
        """For the console: '2 at a time', or the budget and what each run takes of it."""
        fewest, most = self.fewest_trials(), self.most_trials()
        if not self.by_gpus or fewest == most:
            return f"{fewest} at a time"
        return (
            f"{fewest} to {most} at a time: {self.capacity:g} GPUs, a teacher run takes "
            f"{self.weight('teacher'):g} and a student run {self.weight('student'):g}"
        )


def measure_of(spec: SweepSpec, held: dict[str, float] | None = None) -> SlotMeasure:
    """The sweep's slot measure (its `auto` shares resolved). `held`: the GPUs one worker of a
    role keeps from others on the cluster, where more than its share (sweep/gpu_shares.py)."""
    res = spec.sweep.resources
    if spec.sweep.max_concurrent_trials is not None or not res.gpu_budget:
        return SlotMeasure(float(spec.max_concurrent_trials()))
    workers = {role: getattr(res, role) for role in ROLES}
    gpus = {role: w.num_workers * max(w.gpus(), (held or {}).get(role, 0.0)) for role, w in workers.items()}
    if all(g > 0 for g in gpus.values()):
        return SlotMeasure(float(res.gpu_budget), gpus["teacher"], gpus["student"], by_gpus=True)
    if max(gpus.values()) <= 0:
        return SlotMeasure(float(spec.max_concurrent_trials()))
    # a role on CPUs has no GPUs to weigh: runs are counted, every run one slot (a CPU run too),
    # as many slots as the GPU role's runs fit in the budget
    return SlotMeasure(float(max(1, whole(res.gpu_budget / max(gpus.values())))))


def slots_in_use(live_keys: Iterable[str], stored: Callable[[str], bool], measure: SlotMeasure | None = None) -> float:
    """What the live trials (given by their teacher keys) run or are about to run, weighed."""
    measure = measure or SlotMeasure(1.0)
    keys = list(live_keys)
    distilling = sum(1 for key in keys if stored(key))
    training = len({key for key in keys if not stored(key)})
    return distilling * measure.weight("student") + training * measure.weight("teacher")


def whole(x: float) -> int:
    """The whole count in x, forgiving float error (0.3 / 0.1 is 2.9999999999999996)."""
    return math.floor(x + 1e-9)


_DRIVER_LIMITS: dict[tuple[str, str], SlotMeasure] = {}  # (storage root, sweep name) -> what this driver sized


def sweep_id(spec: SweepSpec) -> tuple[str, str]:
    """Which sweep a spec runs, within one process: its storage root and name."""
    return (spec.storage.root, spec.name)


@contextlib.contextmanager
def driver_limit(spec: SweepSpec, measure: SlotMeasure):
    """While the block runs, the sweep's policy in this process counts by `measure`, whatever its
    pickled state says: a resumed sweep's searcher comes back with the measure sized on the
    cluster it first ran on, and `gpus_per_worker: auto` sizes it again on this one.
    (Under Ray Client the searcher runs elsewhere and keeps its pickled measure.)"""
    key = sweep_id(spec)
    previous = _DRIVER_LIMITS.get(key)
    _DRIVER_LIMITS[key] = measure
    try:
        yield
    finally:
        if previous is None:
            _DRIVER_LIMITS.pop(key, None)
        else:
            _DRIVER_LIMITS[key] = previous


class SlotPolicy:
    """Whether the searcher may start another trial now (plain data: pickled with its state)."""

    RECHECK_S = 5.0  # a teacher not stored yet is looked up again at most this often

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        # the driver's measure where built under its driver_limit (sizes read off the cluster),
        # pickled with the searcher: under Ray Client the searcher runs where no limit is set
        self._measure = _DRIVER_LIMITS.get(sweep_id(spec)) or measure_of(spec)
        self._stored: set[str] = set()
        self._checked: dict[str, float] = {}
        self._older_keys: dict[str, list[str]] = {}  # what earlier versions called each key's training

    @property
    def measure(self) -> SlotMeasure:
        return _DRIVER_LIMITS.get(sweep_id(self.spec), self._measure)

    @property
    def max_live(self) -> int:
        measure = self.measure
        return measure.most_trials() + measure.fewest_trials()

    def key(self, config: dict[str, Any]) -> str:
        """The teacher key of the trial that `config` (a suggestion) describes."""
        run_spec, world_size = self.spec.run_spec(config), self.spec.sweep.resources.teacher.num_workers
        key = run_spec.teacher_key(world_size)
        self._older_keys.setdefault(key, run_spec.legacy_teacher_keys(world_size))
        return key

    def may_start(self, live_keys: list[str]) -> bool:
        if len(live_keys) >= self.max_live:
            return False
        measure = self.measure
        # room for a student run at least: a trial that needs a teacher run waits for its
        # weight in the run-slot book, holding no GPU
        in_use = slots_in_use(live_keys, self.is_stored, measure)
        return in_use + measure.weight("student") <= measure.capacity + 1e-9

    def is_stored(self, key: str) -> bool:
        if key in self._stored:  # stored teachers stay stored
            return True
        now = time.monotonic()
        if now - self._checked.get(key, -self.RECHECK_S) < self.RECHECK_S:
            return False
        self._checked[key] = now
        if self._registry_has(key):
            self._stored.add(key)
            return True
        return False

    def _registry_has(self, key: str) -> bool:
        from remem_ray.sweep.layout import SweepLayout
        from remem_ray.sweep.registry import TeacherRegistry

        registry = TeacherRegistry(SweepLayout.of(self.spec).teachers)
        in_use = registry.set_in_use(key, self._older_keys.get(key, []))
        return in_use is not None and not in_use.missing(self.spec.teacher.saved_epochs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checked": {}}  # monotonic times mean nothing after a restart

    def __setstate__(self, state: dict) -> None:
        if "max_concurrent" in state:  # pickled before the limit became a property
            state["_max_concurrent"] = state.pop("max_concurrent")
            state.pop("max_live", None)
        if "_max_concurrent" in state:  # pickled before runs were weighed: one per run
            state["_measure"] = SlotMeasure(float(state.pop("_max_concurrent")))
        self.__dict__.update(state)
