"""remem_ray.sweep.distinct: a sweep never runs a point twice; duplicates are answered with the
first run's outcome; a finite space ends the sweep once every point ran."""

from __future__ import annotations

import optuna
from ray.tune.search import Searcher

from remem_ray.contract import METRIC, stopped_early
from remem_ray.sweep.distinct import DUPLICATE_OF, PointLedger
from remem_ray.sweep.search import TIME_ATTR
from remem_ray.sweep.tune_adapter import budget_aware_optuna_search, study_from_searcher_state

GRID = {"rho": [0.0, 0.05], "teacher_epoch": [2, 4]}
P = [{"rho": r, "teacher_epoch": e} for r in GRID["rho"] for e in GRID["teacher_epoch"]]


def _space(trial):
    trial.suggest_categorical("rho", GRID["rho"])
    trial.suggest_categorical("teacher_epoch", GRID["teacher_epoch"])


def _searcher(points=None):
    ledger = PointLedger(list(GRID), GRID, seed=0)
    return budget_aware_optuna_search(
        _space, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early, points, ledger=ledger
    )


def _report(searcher, trial_id, values, epochs):
    for epoch, value in enumerate(values, 1):
        searcher.on_trial_result(trial_id, {METRIC: value, "epoch": epoch, "epochs": epochs})
    searcher.on_trial_complete(trial_id, {METRIC: values[-1], "epoch": len(values), "epochs": epochs})


def _duplicates(searcher, of: str):
    return [t for t in searcher.study.trials if t.user_attrs.get(DUPLICATE_OF) == of]


def test_a_duplicate_of_a_running_point_waits_for_its_outcome_and_a_new_point_runs():
    searcher = _searcher([P[0], P[0]])  # the second enqueued point repeats the first
    assert searcher.suggest("t1") == P[0]
    second = searcher.suggest("t2")
    assert second != P[0] and second in P  # the duplicate was not handed to Tune
    (duplicate,) = _duplicates(searcher, "t1")
    assert duplicate.state.name == "RUNNING" and duplicate.params == P[0]
    _report(searcher, "t1", [0.5, 0.7], epochs=2)
    (duplicate,) = _duplicates(searcher, "t1")
    original = searcher.study.trials[searcher._ot_trials["t1"].number]
    assert duplicate.state.name == "COMPLETE" and duplicate.value == original.value == 0.7
    assert duplicate.intermediate_values == original.intermediate_values == {1: 0.5, 2: 0.7}


def test_a_duplicate_of_a_stopped_point_is_told_pruned_at_once_with_the_same_curve():
    searcher = _searcher([P[1]])
    assert searcher.suggest("t1") == P[1]
    # ASHA stopped it after epoch 1 of 3
    searcher.on_trial_result("t1", {METRIC: 0.4, "epoch": 1, "epochs": 3})
    searcher.on_trial_complete("t1", {METRIC: 0.4, "epoch": 1, "epochs": 3})
    searcher.study.enqueue_trial(P[1])  # the sampler proposes it again
    assert searcher.suggest("t2") != P[1]
    (duplicate,) = _duplicates(searcher, "t1")
    assert duplicate.state.name == "PRUNED" and duplicate.intermediate_values == {1: 0.4}


def test_tune_trials_are_distinct_points_and_an_exhausted_space_finishes_the_search():
    searcher = _searcher()
    configs = [searcher.suggest(f"t{i}") for i in range(len(P))]
    assert sorted(map(str, configs)) == sorted(map(str, P))  # four trials, four points
    assert searcher.suggest("t-extra") is Searcher.FINISHED and searcher.space_exhausted
    for i, _ in enumerate(P):
        _report(searcher, f"t{i}", [0.1 * (i + 1)], epochs=1)
    # every answered duplicate is finished, with the outcome of the trial of its point
    for trial in searcher.study.trials:
        assert trial.state.is_finished()
        if DUPLICATE_OF in trial.user_attrs:
            first = searcher.study.trials[searcher._ot_trials[trial.user_attrs[DUPLICATE_OF]].number]
            assert (trial.params, trial.value) == (first.params, first.value)


def test_the_ledger_survives_the_searchers_save_and_restore(tmp_path):
    searcher = _searcher([P[0], P[0]])
    searcher.suggest("t1")
    searcher.suggest("t2")
    path = tmp_path / "searcher-state-x.pkl"
    searcher.save(str(path))
    restored = _searcher()
    restored.restore(str(path))
    assert restored.ledger.runner == searcher.ledger.runner and len(restored.ledger.waiting["t1"]) == 1
    _report(restored, "t1", [0.6], epochs=1)  # the waiting duplicate is answered after the restore
    assert [t.state.name for t in _duplicates(restored, "t1")] == ["COMPLETE"]
    assert len(study_from_searcher_state(path.read_bytes()).trials) == len(searcher.study.trials)


def test_a_continuous_space_has_no_end():
    ledger = PointLedger(["rho"], None, seed=0)
    assert ledger.size() is None and not ledger.exhausted() and ledger.unvisited() is None


def test_importances_count_each_point_run_once_not_each_duplicate_answered():
    import optuna

    from remem_ray.sweep.distinct import DUPLICATE_OF
    from remem_ray.sweep.report import importances_of

    dist = {
        "rho": optuna.distributions.CategoricalDistribution([0.0, 0.05, 0.1]),
        "alpha": optuna.distributions.CategoricalDistribution([0.8, 0.9, 1.0]),
    }

    def trial(rho, alpha, value, duplicate=False):
        return optuna.trial.create_trial(
            params={"rho": rho, "alpha": alpha},
            distributions=dist,
            value=value,
            user_attrs={DUPLICATE_OF: 0} if duplicate else {},
        )

    ran = [trial(0.0, 0.8, 0.5), trial(0.05, 0.9, 0.9), trial(0.1, 1.0, 0.6), trial(0.0, 1.0, 0.55)]
    study = optuna.create_study(direction="maximize")
    study.add_trials(ran)
    with_duplicates = optuna.create_study(direction="maximize")
    with_duplicates.add_trials(ran + [trial(0.05, 0.9, 0.9, duplicate=True)] * 3)
    once = importances_of(study)
    assert set(once.values) == {"rho", "alpha"} and once == importances_of(with_duplicates)
    assert once.basis == "the 4 finished trials' best student val accuracy"


def test_a_sweep_expects_num_samples_trials_or_every_point_of_a_smaller_space():
    """The last progress line counted num_samples: after a 4-point space ran out in a 6-trial
    sweep it said "4/6 done, ..., 2 pending", and nothing was left to run."""
    from remem_ray.config import SweepSpec
    from remem_ray.sweep.results import expected_trials

    search = {"rho": {"values": [0.0, 0.05]}, "alpha": {"values": [0.9, 1.0]}, "teacher_epoch": [4]}
    spec = SweepSpec.model_validate({"teacher": {"epochs": 4}, "sweep": {"num_samples": 6, "search": search}})
    assert expected_trials(spec) == 4
    assert expected_trials(spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"num_samples": 3})})) == 3
    continuous = {**search, "alpha": {"low": 0.8, "high": 1.0}}
    assert (
        expected_trials(
            SweepSpec.model_validate({"teacher": {"epochs": 4}, "sweep": {"num_samples": 6, "search": continuous}})
        )
        == 6
    )


def test_importances_under_asha_compare_the_deepest_epoch_every_trial_reached():
    """ASHA stops most trials early: with one finished trial of six (the default sweep) the plot
    was always "too few finished trials". The scores the trials had at the deepest student epoch
    all of them reached are compared; a diverged trial (pruned without values) is left out."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from remem_ray.sweep.report import importances_of

    dist = {
        "rho": optuna.distributions.CategoricalDistribution([0.0, 0.05, 0.1]),
        "alpha": optuna.distributions.CategoricalDistribution([0.9, 1.0]),
    }

    def trial(rho, alpha, curve, state=TrialState.PRUNED):
        return create_trial(
            params={"rho": rho, "alpha": alpha},
            distributions=dist,
            state=state,
            value=curve[-1] if state == TrialState.COMPLETE else None,
            intermediate_values=dict(enumerate(curve, start=1)),
        )

    study = optuna.create_study(direction="maximize")
    study.add_trials(
        [
            trial(0.0, 1.0, [0.80, 0.86, 0.90, 0.92, 0.93, 0.94], TrialState.COMPLETE),
            trial(0.05, 1.0, [0.78, 0.85, 0.90]),
            trial(0.0, 0.9, [0.60, 0.70, 0.83]),
            trial(0.05, 0.9, [0.65, 0.75, 0.86, 0.88, 0.89, 0.89]),
            trial(0.1, 0.9, [0.66, 0.80, 0.89]),
            trial(0.1, 1.0, []),  # diverged: told PRUNED with no values
        ]
    )
    found = importances_of(study)
    assert set(found.values) == {"rho", "alpha"} and abs(sum(found.values.values()) - 1.0) < 1e-6
    assert found.basis == (
        "5 trials' best student val accuracy at student epoch 3, the deepest all of them reached "
        "(ASHA stopped 4 of them early)"
    )
    # alpha alone separates the scores at epoch 3 (1.0: 0.90, 0.90; 0.9: 0.83 to 0.89): it matters more
    assert found.values["alpha"] > found.values["rho"]
    # where most ended trials finished, their final scores are compared, not a shallow rung's
    mostly_finished = optuna.create_study(direction="maximize")
    mostly_finished.add_trials(
        [
            trial(rho, alpha, [0.5, 0.6 + rho + alpha / 10], TrialState.COMPLETE)
            for rho, alpha in ((0.0, 1.0), (0.05, 0.9), (0.1, 1.0))
        ]
        + [trial(0.1, 0.9, [0.4])]
    )
    assert importances_of(mostly_finished).basis == "the 3 finished trials' best student val accuracy"
    # a finished trial rerun after a resume reports only its epochs after the restart: left out
    # at epoch 3, it was still counted among the "stopped" (3 said where all were)
    rerun = create_trial(
        params={"rho": 0.1, "alpha": 0.9},
        distributions=dist,
        state=TrialState.COMPLETE,
        value=0.95,
        intermediate_values={4: 0.91, 5: 0.93, 8: 0.95},
    )
    resumed = optuna.create_study(direction="maximize")
    resumed.add_trials([rerun, trial(0.0, 1.0, [0.7, 0.8, 0.85]), trial(0.05, 1.0, [0.7, 0.8, 0.82])])
    resumed.add_trials([trial(0.05, 0.9, [0.6, 0.7, 0.75])])
    assert importances_of(resumed).basis == (
        "3 trials' best student val accuracy at student epoch 3, the deepest all of them reached "
        "(ASHA stopped 3 of them early)"
    )
