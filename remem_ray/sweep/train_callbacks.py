"""Callbacks that run in a Train run's controller (imported there to unpickle them: keep this
module's imports to Ray's own)."""

from __future__ import annotations

import sys
from typing import Any

from ray.train import UserCallback


class NamesItsTrial(UserCallback):
    """One line, on the controller's stderr, naming the trial whose run's workers raised. Train
    calls `after_exception` as it polls the workers, before its failure policy logs what it
    decides on that same stream (tests/test_ray_adapter.py guards the order): the console maps
    the controller's process to the trial its lines name (sweep/progress.py), so its "a Train
    run failed ..., Train runs it again" line says whose run it was. The line goes to the log
    only (it carries no console mark)."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        ranks = ", ".join(str(rank) for rank in sorted(worker_exceptions))
        print(f"trial {self.trial_id}: its Train run's workers failed (rank {ranks})", file=sys.stderr, flush=True)
