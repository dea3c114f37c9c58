"""Guards for what remem_ray relies on inside Ray Tune and Optuna (remem_ray/sweep/tune_adapter.py):
each fails loudly, naming the moved piece, when a new Ray changes it."""

from __future__ import annotations

import inspect

import optuna
import pytest

from remem_ray.contract import METRIC, stopped_early
from remem_ray.sweep.search import TIME_ATTR
from remem_ray.sweep.tune_adapter import (
    CREDENTIAL_ENV_VARS,
    budget_aware_optuna_search,
    keep_credentials_out_of_runtime_envs,
    study_from_searcher_state,
)


def _space(trial):
    trial.suggest_float("rho", 0.0, 0.1)


def test_optuna_search_takes_storage_study_name_and_sampler():
    from ray.tune.search.optuna import OptunaSearch

    assert {"storage", "study_name", "sampler", "points_to_evaluate"} <= set(
        inspect.signature(OptunaSearch.__init__).parameters
    )


def test_optuna_search_maps_tune_trials_to_optuna_trials_in_ot_trials():
    searcher = budget_aware_optuna_search(
        _space, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )
    searcher.suggest("t1")
    assert isinstance(searcher._ot_trials["t1"], optuna.trial.Trial)
    assert searcher.study.trials[0].number == searcher._ot_trials["t1"].number  # the study Ray asks is ours


def test_stock_optuna_search_still_reports_at_training_iteration_and_tells_stopped_trials_complete():
    """The two behaviours the subclass replaces: if Ray fixes them, the subclass can go."""
    from ray.tune.search.optuna import OptunaSearch

    assert "TRAINING_ITERATION" in inspect.getsource(OptunaSearch.on_trial_result)
    stock = OptunaSearch(space=_space, metric=METRIC, mode="max")
    stock.suggest("stopped")
    stock.on_trial_complete("stopped", {METRIC: 0.9, "epoch": 1, "epochs": 3})
    assert stock._ot_study.trials[0].state.name == "COMPLETE"


def test_the_study_survives_the_searchers_save_and_restore(tmp_path):
    searcher = budget_aware_optuna_search(
        _space, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {METRIC: 0.5, "epoch": 1, "epochs": 2})
    path = tmp_path / "searcher-state-x.pkl"
    searcher.save(str(path))
    study = study_from_searcher_state(path.read_bytes())
    assert study.trials[0].intermediate_values == {1: 0.5}


def test_tune_copies_credentials_into_runtime_envs_unless_kept_out(monkeypatch):
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)
    assert "AWS_SECRET_ACCESS_KEY" in class_cache.ENV_VARS_TO_PROPAGATE  # Ray's default, the reason for this
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-key")
    keep_credentials_out_of_runtime_envs()
    assert not set(CREDENTIAL_ENV_VARS) & set(class_cache.ENV_VARS_TO_PROPAGATE)
    assert class_cache.ENV_VARS_TO_PROPAGATE  # Train's own variables still travel
    # what Tune builds for a trainable no longer carries the key (Tune reads the set on each use)
    actor_cls = class_cache._ActorClassCache().get(type("Trainable", (), {}))
    env_vars = (actor_cls._default_options.get("runtime_env") or {}).get("env_vars", {})
    assert "AWS_SECRET_ACCESS_KEY" not in env_vars


@pytest.mark.parametrize("key", ["study", "_ot_study"])
def test_study_is_read_from_new_and_old_searcher_states(key):
    import pickle

    study = optuna.create_study()
    assert study_from_searcher_state(pickle.dumps({key: study})) is not None
