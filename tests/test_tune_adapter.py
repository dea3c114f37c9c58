"""Guards for what remem_ray relies on inside Ray Tune and Optuna (remem_ray/sweep/tune_adapter.py):
each fails loudly, naming the moved piece, when a new Ray changes it."""

from __future__ import annotations

import inspect

import optuna
import pytest

from remem_ray.contract import METRIC, stopped_early
from remem_ray.sweep.distinct import Outcome
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


def test_asha_never_stops_a_replay_before_its_last_epoch_and_still_ranks_it():
    """Four trials reach the epoch-2 rung; a replayed one with the rung's worst score goes on (it
    costs nothing and its checkpoint exists only from the stored best's epoch: the chaos run found
    four replays stopped early, each without a checkpoint); a distilling one with that score is
    stopped; the replay's score is recorded in the rung like any other; at max_t it stops as all do."""
    from types import SimpleNamespace

    from ray import cloudpickle
    from ray.tune.schedulers import TrialScheduler

    from remem_ray.contract import STUDENT_REPLAYED
    from remem_ray.sweep.tune_adapter import replay_aware_asha

    asha = replay_aware_asha(
        metric=METRIC, mode="max", time_attr=TIME_ATTR, max_t=8, grace_period=2, reduction_factor=2
    )
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(6)]
    for trial in trials:
        asha.on_trial_add(None, trial)
    for trial, score in zip(trials[:4], (0.6, 0.7, 0.8, 0.9)):  # each at or above the rung so far
        assert asha.on_trial_result(None, trial, {TIME_ATTR: 2, METRIC: score}) == TrialScheduler.CONTINUE
    replay = {TIME_ATTR: 2, METRIC: 0.1, STUDENT_REPLAYED: 1}
    assert asha.on_trial_result(None, trials[4], replay) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, trials[5], {TIME_ATTR: 2, METRIC: 0.1}) == TrialScheduler.STOP
    rung = next(recorded for milestone, recorded in asha._trial_info["t4"]._rungs if milestone == 2)
    assert rung["t4"] == 0.1  # ranked, not hidden
    assert asha._num_stopped == 1  # the replay's overruled stop is not counted
    assert asha.on_trial_result(None, trials[4], {**replay, TIME_ATTR: 8}) == TrialScheduler.STOP
    # Tune keeps it in tuner.pkl with ray.cloudpickle (a local class pickles by value) and resumes from it
    restored = cloudpickle.loads(cloudpickle.dumps(asha))
    assert restored.on_trial_result(None, trials[4], {**replay, TIME_ATTR: 4}) == TrialScheduler.CONTINUE


def test_asha_after_a_resume_ranks_new_trials_against_the_results_before_it():
    """Tune saves no scheduler state: after a resume the rungs were empty, so the first trial to
    reach a rung went on whatever its score (failed before: CONTINUE). The restored trials' rung
    scores come back from the study, which the searcher's state keeps."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from remem_ray.sweep.tune_adapter import replay_aware_asha

    searcher = budget_aware_optuna_search(
        _space, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )
    for trial_id, scores in {"t1": (0.7, 0.8, 0.85), "t2": (0.6, 0.9), "t3": (0.5,)}.items():
        searcher.suggest(trial_id)
        for epoch, score in enumerate(scores, start=1):
            searcher.on_trial_result(trial_id, {METRIC: score, TIME_ATTR: epoch, "epochs": 8})
    controller = SimpleNamespace(search_alg=SimpleNamespace(searcher=searcher))  # as schedulers see it

    def fresh_asha():
        return replay_aware_asha(
            metric=METRIC, mode="max", time_attr=TIME_ATTR, max_t=8, grace_period=2, reduction_factor=2
        )

    asha = fresh_asha()  # as a resume unpickles it from tuner.pkl: empty
    for trial_id in ("t1", "t2", "t3"):
        asha.on_trial_add(controller, SimpleNamespace(trial_id=trial_id))
    rung = next(recorded for milestone, recorded in asha._trial_info["t1"]._rungs if milestone == 2)
    assert rung == {"t1": 0.8, "t2": 0.9}  # t3 never reached epoch 2
    new = SimpleNamespace(trial_id="t4")
    asha.on_trial_add(controller, new)  # a new trial, unknown to the study: nothing recalled
    assert asha.on_trial_result(controller, new, {TIME_ATTR: 2, METRIC: 0.75}) == TrialScheduler.STOP
    forgetful = fresh_asha()  # what the resume had before
    forgetful.on_trial_add(controller, new)
    assert forgetful.on_trial_result(controller, new, {TIME_ATTR: 2, METRIC: 0.75}) == TrialScheduler.CONTINUE


def test_tune_hands_schedulers_a_controller_with_the_search_algorithm():
    from ray.tune.execution import tune_controller

    assert '"search_alg"' in inspect.getsource(tune_controller.TuneController._wrapped)
    from ray.tune.search.search_generator import SearchGenerator

    assert "self.searcher = searcher" in inspect.getsource(SearchGenerator.__init__)


class KeyBySlots:
    """The slot policy's interface, every trial startable; its teacher key names the point."""

    def may_start(self, live):
        return True

    def key(self, config):
        return f"teacher-rho-{config['rho']}"


def _two_rhos(trial):
    trial.suggest_categorical("rho", [0.0, 0.05])


def _two_rho_searcher(**kwargs):
    """A searcher over _two_rhos with its point ledger; kwargs: slots, divergence."""
    from remem_ray.sweep.distinct import PointLedger

    ledger = PointLedger(["rho"], {"rho": [0.0, 0.05]}, seed=0)
    return budget_aware_optuna_search(
        _two_rhos, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early, ledger=ledger, **kwargs
    )


def test_an_errored_trial_rerun_by_a_resume_reaches_the_study_and_the_slots_again(tmp_path):
    """Tune's resume reruns an errored trial under its id without telling the searcher: before the
    searcher reopened it, the rerun's results were dropped and the study kept the point FAIL."""
    from remem_ray.sweep.distinct import DUPLICATE_OF
    from remem_ray.sweep.tune_adapter import RERUN_OF

    def searcher():
        return _two_rho_searcher(slots=KeyBySlots())

    first = searcher()
    point = first.suggest("t1")
    first.on_trial_complete("t1", error=True)  # retries spent: Tune tells the searcher once
    assert "t1" not in first.live and first.ledger.outcomes["t1"].state == "FAIL"
    path = tmp_path / "searcher-state-x.pkl"
    first.save(str(path))

    resumed = searcher()
    resumed.restore(str(path))
    assert resumed.live == {"t1": f"teacher-rho-{point['rho']}"}  # it holds a slot again
    assert "t1" not in resumed.ledger.outcomes  # a duplicate of its point waits for the rerun
    resumed.study.enqueue_trial(point)  # the sampler proposes the point again while it reruns
    assert resumed.suggest("t2") != point
    resumed.on_trial_result("t1", {METRIC: 0.6, "epoch": 1, "epochs": 2})
    resumed.on_trial_complete("t1", {METRIC: 0.8, "epoch": 2, "epochs": 2})
    failed, rerun = resumed.study.trials[:2]
    assert failed.state.name == "FAIL" and failed.params == rerun.params == point
    assert rerun.state.name == "COMPLETE" and rerun.value == 0.8 and rerun.intermediate_values == {1: 0.6}
    assert rerun.user_attrs[RERUN_OF] == failed.number
    assert resumed.ledger.outcomes["t1"].value == 0.8 and "t1" not in resumed.live
    # a duplicate of the point suggested while the rerun ran waited for it and has its outcome
    (duplicate,) = [t for t in resumed.study.trials[2:] if t.user_attrs.get(DUPLICATE_OF) == "t1"]
    assert duplicate.state.name == "COMPLETE" and duplicate.value == 0.8
    # a second save and restore reopens nothing more
    resumed.save(str(path))
    again = searcher()
    again.restore(str(path))
    assert len(again.study.trials) == len(resumed.study.trials) and again.live == {"t2": resumed.live["t2"]}


def test_a_trial_told_complete_that_then_errors_is_reopened_on_resume_too(tmp_path):
    """Tune can end a trial as ERROR after telling the searcher it completed (a stop that then
    failed): resume reruns it, so its results must reach the study then too."""
    first = budget_aware_optuna_search(
        _two_rhos, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )
    first.suggest("t1")
    first.on_trial_complete("t1", {METRIC: 0.5, "epoch": 2, "epochs": 2})
    first.on_trial_complete("t1", error=True)
    path = tmp_path / "searcher-state-x.pkl"
    first.save(str(path))
    resumed = budget_aware_optuna_search(
        _two_rhos, METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )
    resumed.restore(str(path))
    resumed.on_trial_complete("t1", {METRIC: 0.7, "epoch": 2, "epochs": 2})
    assert [(t.state.name, t.value) for t in resumed.study.trials] == [("COMPLETE", 0.5), ("COMPLETE", 0.7)]


def test_tune_still_logs_trial_failures_with_the_records_kept_off_the_console():
    """TuneFailureRecordsOffConsole matches these records by their text: a Ray that rewords them
    would put the whole tracebacks back on the console."""
    import ray.tune.execution.tune_controller as controller
    import ray.tune.tune as tune_module

    from remem_ray.sweep.tune_adapter import TUNE_FAILURE_RECORDS

    assert f'logger.error(f"{TUNE_FAILURE_RECORDS[0]}{{trial}}"' in inspect.getsource(controller)
    assert f'logger.error("{TUNE_FAILURE_RECORDS[1]}%s"' in inspect.getsource(tune_module)
    assert controller.logger.name.startswith("ray.tune") and tune_module.logger.name.startswith("ray.tune")


def _rho_in_unit(trial):
    trial.suggest_float("rho", 0.0, 1.0)


def _diverged_above_half(config):
    return "teacher diverged (recorded)" if config["rho"] > 0.5 else None


@pytest.mark.parametrize("reported", [0, 2])  # a teacher diverged (no student epoch), a student after 2
def test_an_errored_trial_whose_point_diverged_reaches_the_study_as_pruned_without_values(reported):
    """A diverged point told FAIL (as before) is ignored by TPE, which then proposes its region
    again. PRUNED with no intermediate value, it ranks below every other trial; a student that
    reported epochs before it diverged keeps them (Optuna would rank it by its deepest step,
    above trials ASHA stopped earlier), so it is told FAIL and a valueless PRUNED trial of its
    point is added in its name. Its duplicates are told the same; a failed lookup leaves FAIL."""
    from remem_ray.sweep.tune_adapter import DIVERGED, DIVERGED_IN_PLACE_OF

    def lookup(config):
        if config["rho"] == 0.05:
            return "teacher 1234 diverged (recorded in teachers/1234/diverged.json)"
        raise OSError("storage not answering")  # read failed: the trial stays FAIL

    searcher = _two_rho_searcher(divergence=lookup)
    points = {tid: searcher.suggest(tid)["rho"] for tid in ("t1", "t2")}
    diverged = next(tid for tid, rho in points.items() if rho == 0.05)
    unread = next(tid for tid, rho in points.items() if rho == 0.0)
    for epoch in range(1, reported + 1):
        searcher.on_trial_result(diverged, {METRIC: 0.4, "epoch": epoch, "epochs": 3})
    searcher.on_trial_complete(diverged, error=True)
    searcher.on_trial_complete(unread, error=True)
    trials = searcher.study.trials
    told = [t for t in trials if t.params["rho"] == 0.05 and t.state.name == "PRUNED"]
    assert len(told) == 1 and told[0].value is None and told[0].intermediate_values == {}
    assert told[0].user_attrs[DIVERGED].startswith("teacher 1234 diverged")
    (first,) = [t for t in trials if t.number == searcher._ot_trials[diverged].number]
    if reported:  # the trial itself FAIL, its epochs kept; the PRUNED one stands for it
        assert first.state.name == "FAIL" and first.intermediate_values == {1: 0.4, 2: 0.4}
        assert told[0].user_attrs[DIVERGED_IN_PLACE_OF] == first.number and len(trials) == 3
    else:
        assert first is told[0] and len(trials) == 2
    (failed,) = [t for t in trials if t.params["rho"] == 0.0]
    assert failed.state.name == "FAIL" and DIVERGED not in failed.user_attrs
    ledger = searcher.ledger
    assert ledger.outcomes[diverged] == Outcome("PRUNED", None, ()) and ledger.outcomes[unread].state == "FAIL"
    assert diverged in searcher.errored and unread in searcher.errored  # a resume reruns both, as before


@pytest.mark.parametrize("reported", [0, 3])
def test_tpe_steers_away_from_a_diverged_region_only_when_told_it_diverged(reported):
    """The reason for telling PRUNED without values: with the same seeded sampler and outcomes,
    the searcher told of divergences proposes far fewer points in the diverging region, whether
    it diverged at once (a teacher) or after `reported` student epochs beside trials ASHA
    stopped at its first rung (seeds 0-5: 3-12 of 32 against 26-31 told FAIL, either way; told
    PRUNED with its epochs, the late case got 20-28)."""

    def proposals_above_half(divergence) -> int:
        searcher = budget_aware_optuna_search(
            _rho_in_unit,
            METRIC,
            "max",
            optuna.samplers.TPESampler(seed=3, n_startup_trials=8),
            TIME_ATTR,
            stopped_early,
            divergence=divergence,
        )
        above = 0
        for n in range(40):
            tid = f"t{n}"
            rho = searcher.suggest(tid)["rho"]
            if rho > 0.5:
                above += n >= 8  # counted once TPE, not the random start, proposes
                for epoch in range(1, reported + 1):
                    searcher.on_trial_result(tid, {METRIC: 0.6, "epoch": epoch, "epochs": 4})
                searcher.on_trial_complete(tid, error=True)
            elif reported:  # stopped by ASHA at its first rung (Tune passes that result to the completion only)
                searcher.on_trial_complete(tid, {METRIC: 0.5, "epoch": 1, "epochs": 4})
            else:
                searcher.on_trial_complete(tid, {METRIC: 0.5, "epoch": 3, "epochs": 3})
        return above

    told, ignored = proposals_above_half(_diverged_above_half), proposals_above_half(None)
    assert told <= ignored / 2, (told, ignored)
