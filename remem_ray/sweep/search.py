"""Search: a seeded Optuna TPE define-by-run space with ASHA, ASHA-stopped trials told as pruned."""

from __future__ import annotations

from typing import Any

from remem_ray.config import ParamRange, SweepSpec
from remem_ray.search_params import SEARCH_PARAMS, TEACHER_EPOCH

METRIC = "best_val_acc"  # the best student val accuracy so far: what the sweep keeps
MODE = "max"
# Budgets count student epochs, as each result reports them; Tune's training_iteration restarts
# at 1 when a student Train run is retried or the sweep resumes, while the student goes on at k + 1.
TIME_ATTR = "epoch"


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


def stopped_early(result: dict[str, Any] | None) -> bool:
    """A trial that reported fewer student epochs than it was given was stopped by the scheduler."""
    return bool(result) and "epochs" in result and result.get("epoch", 0) < result["epochs"]


def _optuna_search_class():
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class BudgetAwareOptunaSearch(OptunaSearch):
        """OptunaSearch that tells ASHA-stopped trials as PRUNED, not COMPLETE.

        Stock OptunaSearch tells a stopped trial's partial-budget score as COMPLETE, so TPE
        would rank a 1-epoch student against full ones. Their per-epoch values still reach
        the study as intermediate values (on_trial_result), which TPE uses for pruned trials.
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            """Intermediate values at the student's epoch (stock: at training_iteration)."""
            if trial_id in self._completed_trials or TIME_ATTR not in result:
                return super().on_trial_result(trial_id, result)
            self._ot_trials[trial_id].report(float(result[self._metric]), int(result[TIME_ATTR]))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if error or not stopped_early(result) or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result=result, error=error)
            ot_trial = self._ot_trials[trial_id]
            # Tune does not pass the result that triggered the stop to on_trial_result: record it
            # here, so TPE ranks the pruned trial by the score it reached at its last rung.
            # (Optuna ignores, with a warning, a step that was reported already.)
            if result.get(self._metric) is not None:
                ot_trial.report(float(result[self._metric]), int(result[TIME_ATTR]))
            try:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            except Exception as exc:  # as the stock class does: never let a tell crash the sweep
                import logging

                logging.getLogger(__name__).warning("could not tell pruned trial %s: %s", trial_id, exc)
            self._completed_trials.add(trial_id)

    return BudgetAwareOptunaSearch


def _typed_point(point: dict[str, float]) -> dict[str, Any]:
    return {k: SEARCH_PARAMS[k].cast(v) for k, v in point.items()}


def build_searcher(spec: SweepSpec):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    searcher_cls = _optuna_search_class()
    searcher = searcher_cls(
        space=DefineByRunSpace(spec),
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=spec.sweep.seed),
        points_to_evaluate=[_typed_point(p) for p in spec.sweep.points_to_evaluate] or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent_trials())


def build_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = spec.sweep.asha
    if not asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(metric=METRIC, mode=MODE, time_attr=TIME_ATTR, max_t=spec.student.epochs,
                         grace_period=min(asha.grace_period, spec.student.epochs),
                         reduction_factor=asha.reduction_factor)
