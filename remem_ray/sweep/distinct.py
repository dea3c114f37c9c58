"""Distinct points: a sweep never runs a point twice (issue 25).

A trial's result is a function of its point (and the sweep's seeds), so a second run of a point
is pure waste. Seeded TPE on small categorical spaces proposes points again often. The ledger
keeps which Tune trial runs each point; a suggestion equal to one of them is not run: its Optuna
trial is told the first one's outcome (marked `duplicate_of` in the study), at once if that
trial has finished, else when it does, and the searcher asks again. In a finite space that has
every point run or running, the searcher says it is finished.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DUPLICATE_OF = "duplicate_of"  # user attribute of an Optuna trial answered with another's outcome


def grid_size(grid: Mapping[str, Sequence[Any]] | None) -> int | None:
    """The distinct points of a finite space (None: a continuous one, no end)."""
    return None if grid is None else math.prod(len(set(values)) for values in grid.values())


@dataclass(frozen=True)
class Outcome:
    state: str  # an optuna.trial.TrialState name: COMPLETE, PRUNED, FAIL
    value: float | None
    intermediate: tuple[tuple[int, float], ...]


class PointLedger:
    def __init__(self, names: Sequence[str], grid: Mapping[str, Sequence[Any]] | None, seed: int) -> None:
        """names: the searched parameters; grid: each one's values where all are categorical
        (a finite space), else None."""
        self.names = tuple(sorted(names))
        self.grid = {k: list(v) for k, v in grid.items()} if grid is not None else None
        self.rng = random.Random(seed)
        self.runner: dict[tuple, str] = {}  # point -> the Tune trial that runs it
        self.outcomes: dict[str, Outcome] = {}  # Tune trial -> its outcome, once finished
        self.waiting: dict[str, list[Any]] = {}  # Tune trial -> Optuna trials answered when it finishes
        self.answered = 0

    def key(self, config: Mapping[str, Any]) -> tuple:
        return tuple((name, config[name]) for name in self.names)

    def size(self) -> int | None:
        """How many distinct points the space has (None: infinite)."""
        return grid_size(self.grid)

    def exhausted(self) -> bool:
        size = self.size()
        return size is not None and len(self.runner) >= size

    def claim(self, trial_id: str, config: Mapping[str, Any]) -> str | None:
        """Record `trial_id` as running this point; if another trial has it, that one's id."""
        point = self.key(config)
        first = self.runner.setdefault(point, trial_id)
        return None if first == trial_id else first

    def answer(self, duplicate, first: str, tell) -> None:
        """Mark an Optuna trial as a duplicate of Tune trial `first` and tell it first's outcome
        now, or once first finishes. tell(optuna_trial, outcome)."""
        self.answered += 1
        duplicate.set_user_attr(DUPLICATE_OF, first)
        if first in self.outcomes:
            tell(duplicate, self.outcomes[first])
        else:
            self.waiting.setdefault(first, []).append(duplicate)

    def finished(self, trial_id: str, outcome: Outcome, tell) -> None:
        self.outcomes[trial_id] = outcome
        for duplicate in self.waiting.pop(trial_id, []):
            tell(duplicate, outcome)

    def unvisited(self) -> dict[str, Any] | None:
        """A seeded draw among the finite space's points no trial runs (None if none, or infinite)."""
        if self.grid is None:
            return None
        names = list(self.grid)
        points = [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]
        free = [p for p in points if self.key(p) not in self.runner]
        return self.rng.choice(free) if free else None


def outcome_of(frozen) -> Outcome:
    """An Optuna FrozenTrial's outcome, to tell its duplicates."""
    return Outcome(frozen.state.name, frozen.value, tuple(sorted(frozen.intermediate_values.items())))


def tell_outcome(study, trial, outcome: Outcome) -> None:
    """Tell `trial` what another trial of the same point reported and how it ended."""
    from optuna.trial import TrialState

    for step, value in outcome.intermediate:
        trial.report(value, step)
    state = TrialState[outcome.state]
    study.tell(trial, outcome.value if state == TrialState.COMPLETE else None, state=state)
