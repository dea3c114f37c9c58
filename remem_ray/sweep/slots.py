"""How many trials a sweep runs at once, counted by what holds a GPU slot.

A trial runs one Train run at a time: its teacher's (when it holds the teacher's lease) or its
student's. Trials whose teacher another live trial is training wait, with no Train run and so
no GPU; counting them against `max_concurrent_trials` (sized from the GPU budget) would leave
GPUs idle while they wait. So a new trial may start while

    trials whose teacher is stored  +  teachers being trained  <  max_concurrent

and, so that a crowd of waiters never floods the cluster once their teacher is stored, while
fewer than twice max_concurrent trials are live.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from remem_ray.config import SweepSpec


def slots_in_use(live_keys: Iterable[str], stored: Callable[[str], bool]) -> int:
    """Train runs the live trials (given by their teacher keys) run or are about to run."""
    keys = list(live_keys)
    distilling = sum(1 for key in keys if stored(key))
    training = len({key for key in keys if not stored(key)})
    return distilling + training


_DRIVER_LIMITS: dict[tuple[str, str], int] = {}  # (storage root, sweep name) -> what this driver sized


def sweep_id(spec: SweepSpec) -> tuple[str, str]:
    """Which sweep a spec runs, within one process: its storage root and name."""
    return (spec.storage.root, spec.name)


@contextlib.contextmanager
def driver_limit(spec: SweepSpec, max_concurrent: int):
    """While the block runs, the sweep's policy in this process allows `max_concurrent` trials,
    whatever its pickled state says: a resumed sweep's searcher comes back with the limit sized
    on the cluster it first ran on, and `gpus_per_worker: auto` sizes it again on this one.
    (Under Ray Client the searcher runs elsewhere and keeps its pickled limit.)"""
    key = sweep_id(spec)
    previous = _DRIVER_LIMITS.get(key)
    _DRIVER_LIMITS[key] = max_concurrent
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
        self._max_concurrent = spec.max_concurrent_trials()
        self._stored: set[str] = set()
        self._checked: dict[str, float] = {}
        self._older_keys: dict[str, list[str]] = {}  # what earlier versions called each key's training

    @property
    def max_concurrent(self) -> int:
        return _DRIVER_LIMITS.get(sweep_id(self.spec), self._max_concurrent)

    @property
    def max_live(self) -> int:
        return 2 * self.max_concurrent

    def key(self, config: dict[str, Any]) -> str:
        """The teacher key of the trial that `config` (a suggestion) describes."""
        run_spec, world_size = self.spec.run_spec(config), self.spec.sweep.resources.teacher.num_workers
        key = run_spec.teacher_key(world_size)
        self._older_keys.setdefault(key, run_spec.legacy_teacher_keys(world_size))
        return key

    def may_start(self, live_keys: list[str]) -> bool:
        if len(live_keys) >= self.max_live:
            return False
        return slots_in_use(live_keys, self.is_stored) < self.max_concurrent

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
        self.__dict__.update(state)
