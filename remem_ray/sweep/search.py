"""Search: a seeded Optuna TPE define-by-run space with ASHA, ASHA-stopped trials told as pruned."""

from __future__ import annotations

from typing import Any

from remem_ray.config import ParamRange, SweepSpec
from remem_ray.contract import EPOCH, METRIC, MODE, stopped_early
from remem_ray.search_params import SEARCH_PARAMS, TEACHER_EPOCH
from remem_ray.sweep.distinct import PointLedger, grid_size
from remem_ray.sweep.slots import SlotPolicy
from remem_ray.sweep.tune_adapter import budget_aware_optuna_search, replay_aware_asha

# Budgets count student epochs, as each result reports them; Tune's training_iteration restarts
# at 1 when a student Train run is retried or the sweep resumes, while the student goes on at k + 1.
TIME_ATTR = EPOCH


def _suggest(trial, name: str, dim: ParamRange):
    if dim.values is not None:
        return trial.suggest_categorical(name, list(dim.values))
    return trial.suggest_float(name, dim.low, dim.high, log=dim.log)


class DefineByRunSpace:
    """Optuna define-by-run space as a picklable object (a closure breaks Tune's checkpoints)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.dims: dict[str, ParamRange] = dict(spec.sweep.search.ranges())
        self.teacher_epochs = spec.teacher_epochs()

    def __call__(self, trial) -> None:
        for name, dim in self.dims.items():
            _suggest(trial, name, dim)
        trial.suggest_categorical(TEACHER_EPOCH.name, self.teacher_epochs)


def space_grid(spec: SweepSpec) -> dict[str, list[Any]] | None:
    """Each searched parameter's values where every one is categorical (a finite space), else None."""
    space = DefineByRunSpace(spec)
    if any(dim.values is None for dim in space.dims.values()):
        return None
    grid = {name: list(dim.values or []) for name, dim in space.dims.items()}
    return {**grid, TEACHER_EPOCH.name: list(space.teacher_epochs)}


def space_size(spec: SweepSpec) -> int | None:
    """How many distinct points the sweep can run (None: a continuous range, no end)."""
    return grid_size(space_grid(spec))


def _typed_point(point: dict[str, float]) -> dict[str, Any]:
    return {k: SEARCH_PARAMS[k].cast(v) for k, v in point.items()}


class DivergenceLookup:
    """Why a point's training diverged: its teacher's or its student's record in the registries,
    read by the searcher when a trial errors (plain data: pickled with the searcher's state)."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec

    def __call__(self, config: dict[str, Any]) -> str | None:
        from remem_ray.sweep.layout import SweepLayout
        from remem_ray.sweep.registry import TeacherRegistry
        from remem_ray.sweep.students import StudentRegistry

        teacher_key, student_key = self.spec.trial_keys(self.spec.run_spec(config))
        layout = SweepLayout.of(self.spec)
        teacher = TeacherRegistry(layout.teachers).divergence(teacher_key)
        if teacher is not None:
            return teacher
        return StudentRegistry(layout.students).divergence(student_key)


def build_searcher(spec: SweepSpec):
    """The Optuna searcher; it also bounds concurrency, by GPU slots (see sweep/slots.py)."""
    import optuna

    return budget_aware_optuna_search(
        DefineByRunSpace(spec),
        METRIC,
        MODE,
        optuna.samplers.TPESampler(seed=spec.sweep.seed),
        TIME_ATTR,
        stopped_early,
        # points past num_samples never run: enqueued, they would stay WAITING in the stored study
        [_typed_point(p) for p in spec.sweep.points_to_evaluate[: spec.sweep.num_samples]] or None,
        slots=SlotPolicy(spec),
        ledger=PointLedger([*DefineByRunSpace(spec).dims, TEACHER_EPOCH.name], space_grid(spec), spec.sweep.seed),
        divergence=DivergenceLookup(spec),
    )


def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import FIFOScheduler

    asha = spec.sweep.asha
    if not asha.enabled:
        return FIFOScheduler()
    return replay_aware_asha(
        metric=METRIC,
        mode=MODE,
        time_attr=TIME_ATTR,
        max_t=spec.student.epochs,
        grace_period=min(asha.grace_period, spec.student.epochs),
        reduction_factor=asha.reduction_factor,
    )
