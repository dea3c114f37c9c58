"""What remem_ray relies on inside Ray Tune and its Optuna searcher, in one place
(checked against ray 2.60.0 and optuna 5.1.0; tests/test_tune_adapter.py guards each).

- `OptunaSearch` keeps Tune trial id -> Optuna trial in `_ot_trials` (no public accessor):
  needed to report intermediate values at the student's epoch and to tell a stopped trial
  as PRUNED; and the ids it has told in `_completed_trials` (reopened below). Otherwise the
  study is ours (created here and handed to OptunaSearch through its public storage /
  study_name / sampler arguments), the metric is `self.metric`.
- Tune pickles the searcher whole into tuner.pkl, this class by value (it is local): a sweep
  resumes with the searcher code it started with, so a change here reaches new sweeps only.
- `ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`: the environment variables Tune copies
  into every trainable's runtime env (AWS keys among them); no public switch exists.
- `AsyncHyperBandScheduler._time_attr` / `._max_t` / `._num_stopped`: read (and the count mended)
  by the ASHA that never stops a replay; `._trial_info` (trial id -> its bracket), the bracket's
  `_rungs` ([(epoch, {trial id: score x `_metric_op`})]): filled again for restored trials, from
  the study (Tune saves no scheduler state). A scheduler reaches the searcher through the
  controller's `search_alg` (whitelisted for schedulers) and its `searcher`.
- Tune logs each trial failure's whole traceback at ERROR ("Trial task failed for trial ...",
  ray/tune/execution/tune_controller.py) and, at the end, "Trials did not complete: ...":
  the console shows one line per failure instead (remem_ray.sweep.progress), the log keeps them.
- Tune's resume (`resume_errored=True`) sets an errored trial back to PENDING under its id without
  telling the searcher; `OptunaSearch._completed_trials` then drops the rerun's completion. The
  searcher reopens such trials itself on restore (Optuna: `Study.add_trial` of a RUNNING trial,
  then `optuna.trial.Trial(study, FrozenTrial._trial_id)`, the constructor Optuna's own ask
  uses, with a private id).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

STUDY_NAME = "remem"
MAX_ASKS = 50  # suggestions tried per new trial before Tune is told to ask again later
ASK_BEFORE_DRAWING = 5  # duplicates in a row before a free point of a finite space is enqueued
RERUN_OF = "rerun_of"  # user attribute of an Optuna trial: the number of the failed attempt it reruns
DIVERGED = "diverged"  # user attribute of an Optuna trial whose training diverged: the record's line
DIVERGED_IN_PLACE_OF = "diverged_in_place_of"  # a PRUNED trial added for a diverged one told FAIL: its number
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


TUNE_FAILURE_RECORDS = ("Trial task failed for trial ", "Trials did not complete: ")


class TuneFailureRecordsOffConsole(logging.Filter):
    """For Ray's console handler: Tune's failure tracebacks go to the sweep log only (its own
    handler takes them), the console has the trial's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("ray.tune") and str(record.msg).startswith(TUNE_FAILURE_RECORDS))


def budget_aware_optuna_search(
    space,
    metric: str,
    mode: str,
    sampler,
    time_attr: str,
    stopped_early,
    points_to_evaluate: list[dict[str, Any]] | None = None,
    slots=None,
    ledger=None,
    divergence=None,
):
    """An OptunaSearch that reports intermediate values at `result[time_attr]` (stock: at
    training_iteration) and tells scheduler-stopped trials as PRUNED (stock: COMPLETE, so TPE
    would rank a 1-epoch student against full ones). `searcher.study` is the Optuna study.

    `slots` (a remem_ray.sweep.slots.SlotPolicy) limits concurrency in place of a
    ConcurrencyLimiter: it counts what holds GPUs, not trials waiting for another's teacher.
    `ledger` (a remem_ray.sweep.distinct.PointLedger): no point runs twice; a duplicate
    suggestion is answered with the first run's outcome and another point is asked.
    `divergence` (config -> why its training diverged, or None; sweep.search.DivergenceLookup):
    an errored trial whose point diverged reaches the study as PRUNED with no intermediate value,
    which TPE ranks below every other trial, so it steers away from the point's region; a FAIL
    it would ignore, and propose the region again (on a GPU cluster, another teacher training to
    NaN). See `_tell_diverged`."""
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class BudgetAwareOptunaSearch(OptunaSearch):
        def __init__(self, study: optuna.Study, slots, **kwargs: Any) -> None:
            self.study = study  # ours, public; pickled with the searcher's state
            self.told: set[str] = set()
            self.slots = slots
            self.live: dict[str, str] = {}  # trial id -> teacher key, while the trial runs
            self.ledger = ledger
            self.space_exhausted = False
            self.errored: set[str] = set()  # failed for good; a resume reruns them (resume_errored)
            super().__init__(**kwargs)

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            self._reopen_errored()

        def _reopen_errored(self) -> None:
            """Give each errored trial, which the resume reruns under its id, a new Optuna trial at
            its point: its results reach the study again, the slot policy counts it again and a
            duplicate of its point waits for the rerun. The failed attempt stays FAIL in the study."""
            from optuna.trial import Trial, TrialState, create_trial
            from ray.tune.utils.util import unflatten_dict

            for trial_id in sorted(self.errored):
                failed = self.study.trials[self._ot_trials[trial_id].number]
                self.study.add_trial(
                    create_trial(
                        state=TrialState.RUNNING,
                        params=failed.params,
                        distributions=failed.distributions,
                        user_attrs={RERUN_OF: failed.number},
                    )
                )
                self._ot_trials[trial_id] = Trial(self.study, self.study.trials[-1]._trial_id)
                self.told.discard(trial_id)
                self._completed_trials.discard(trial_id)
                if self.slots is not None:
                    self.live[trial_id] = self.slots.key(unflatten_dict(failed.params))
                if self.ledger is not None:
                    self.ledger.outcomes.pop(trial_id, None)
            self.errored = set()

        def suggest(self, trial_id: str):
            if self.slots is not None and not self.slots.may_start(list(self.live.values())):
                return None  # Tune asks again later
            if self.ledger is not None and self.ledger.exhausted():
                self.space_exhausted = True
                return Searcher.FINISHED
            for attempt in range(MAX_ASKS):
                config = super().suggest(trial_id)
                first = self.ledger.claim(trial_id, config) if self.ledger and isinstance(config, dict) else None
                if first is None:
                    if self.slots is not None and isinstance(config, dict):
                        self.live[trial_id] = self.slots.key(config)
                    return config
                self.ledger.answer(self._ot_trials.pop(trial_id), first, self._tell_outcome)
                if attempt + 1 >= ASK_BEFORE_DRAWING:  # TPE keeps proposing points it has: draw a free one
                    free = self.ledger.unvisited()
                    if free is not None:
                        self.study.enqueue_trial(free)
            return None  # every ask a duplicate: Tune asks again later

        def _tell_outcome(self, trial, outcome) -> None:
            from remem_ray.sweep.distinct import tell_outcome

            try:
                tell_outcome(self.study, trial, outcome)
            except (ValueError, RuntimeError) as exc:  # as the stock class does: never let a tell crash the sweep
                logging.getLogger(__name__).warning("could not tell duplicate trial %s: %s", trial.number, exc)

        def _record_outcome(self, trial_id: str) -> None:
            if self.ledger is None or trial_id not in self._ot_trials:
                return
            from remem_ray.sweep.distinct import outcome_of

            frozen = self.study.trials[self._ot_trials[trial_id].number]
            if frozen.state.is_finished():
                self.ledger.finished(trial_id, outcome_of(frozen), self._tell_outcome)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id in self.told or time_attr not in result or self.metric not in result:
                return
            self._ot_trials[trial_id].report(float(result[self.metric]), int(result[time_attr]))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.live.pop(trial_id, None)
            if error:  # even one told already (a stop that then failed): resume reruns it
                self.errored.add(trial_id)
            if trial_id in self.told:
                return
            self.told.add(trial_id)
            why = self._divergence(trial_id) if error else None
            if why is not None:
                return self._tell_diverged(trial_id, why)
            if error or not stopped_early(result):
                super().on_trial_complete(trial_id, result=result, error=error)
                return self._record_outcome(trial_id)
            assert result is not None  # stopped_early(None) is False
            ot_trial = self._ot_trials[trial_id]
            # Tune does not pass the result that triggered the stop to on_trial_result: record it
            # here, so TPE ranks the pruned trial by the score it reached at its last rung.
            # (Optuna ignores, with a warning, a step that was reported already.)
            if result.get(self.metric) is not None:
                ot_trial.report(float(result[self.metric]), int(result[time_attr]))
            try:
                self.study.tell(ot_trial, state=TrialState.PRUNED)
            except (ValueError, RuntimeError) as exc:  # as the stock class does: never let a tell crash the sweep
                logging.getLogger(__name__).warning("could not tell pruned trial %s: %s", trial_id, exc)
            self._record_outcome(trial_id)

        def _tell_diverged(self, trial_id: str, why: str) -> None:
            """The point as PRUNED with no intermediate value, which TPE ranks below every other
            trial. Optuna ranks a pruned trial by its deepest reported step, and a student that
            diverged after some epochs cannot take them back: that trial is told FAIL, and a
            PRUNED trial of its point, without values, is added in its name."""
            from optuna.trial import create_trial

            from remem_ray.sweep.distinct import Outcome

            ot_trial = self._ot_trials[trial_id]
            try:
                ot_trial.set_user_attr(DIVERGED, why)
                reported = self.study.trials[ot_trial.number]
                if not reported.intermediate_values:
                    self.study.tell(ot_trial, state=TrialState.PRUNED)
                else:
                    self.study.tell(ot_trial, state=TrialState.FAIL)
                    self.study.add_trial(
                        create_trial(
                            state=TrialState.PRUNED,
                            params=reported.params,
                            distributions=reported.distributions,
                            user_attrs={DIVERGED: why, DIVERGED_IN_PLACE_OF: reported.number},
                        )
                    )
            except (ValueError, RuntimeError) as exc:  # as the stock class does: never let a tell crash the sweep
                logging.getLogger(__name__).warning("could not tell diverged trial %s: %s", trial_id, exc)
            if self.ledger is not None:  # its duplicates: the same, without values
                self.ledger.finished(trial_id, Outcome(TrialState.PRUNED.name, None, ()), self._tell_outcome)

        def _divergence(self, trial_id: str) -> str | None:
            """Why an errored trial's point diverged, if it did (its key's record); a lookup that
            fails (storage out) leaves the trial FAIL, as before the lookup existed."""
            if divergence is None or trial_id not in self._ot_trials:
                return None
            from ray.tune.utils.util import unflatten_dict

            try:
                return divergence(unflatten_dict(self._ot_trials[trial_id].params))
            except Exception as exc:  # noqa: BLE001  never let the lookup crash the sweep's driver
                logging.getLogger(__name__).warning("could not read whether trial %s diverged: %s", trial_id, exc)
                return None

    storage = optuna.storages.InMemoryStorage()  # rolls back with Tune's searcher snapshot on resume
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, sampler=sampler, direction="maximize" if mode == "max" else "minimize"
    )
    return BudgetAwareOptunaSearch(
        study,
        slots,
        space=space,
        metric=metric,
        mode=mode,
        sampler=sampler,
        storage=storage,
        study_name=STUDY_NAME,
        points_to_evaluate=points_to_evaluate,
    )


def replay_aware_asha(**kwargs):
    """Tune's ASHAScheduler (kwargs as its own), except that a replayed trial (a stored student's
    curve, reported in seconds: remem_ray.sweep.students) is never stopped before its last epoch.
    Stopping one saves no compute, and it would leave the trial without its student's checkpoint
    (a replay points at the stored best only from that best's epoch on) while the finished student
    exists. Its results still enter the rungs, as the original run's did."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from remem_ray.contract import STUDENT_REPLAYED

    class ReplayAwareASHA(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial) -> None:
            super().on_trial_add(tune_controller, trial)
            self._recall_rungs(tune_controller, trial)

        def _recall_rungs(self, tune_controller, trial) -> None:
            """A trial a resume restores: its place in each rung it had reached, from the study
            (one intermediate value per epoch), as ASHA recorded it then (the first result at or
            past the rung's epoch). Tune saves no scheduler state (ray 2.60), so the rungs came
            back empty, and trials after a resume were judged against only each other."""
            searcher = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
            ot_trial = getattr(searcher, "_ot_trials", {}).get(trial.trial_id)
            bracket = self._trial_info.get(trial.trial_id)
            if searcher is None or ot_trial is None or bracket is None:  # a new trial: nothing reported yet
                return
            values = searcher.study.trials[ot_trial.number].intermediate_values
            for milestone, recorded in bracket._rungs:
                reached = [step for step in values if step >= milestone]
                if reached and trial.trial_id not in recorded:
                    recorded[trial.trial_id] = self._metric_op * values[min(reached)]

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if (
                action == TrialScheduler.STOP
                and result.get(STUDENT_REPLAYED)
                and result.get(self._time_attr, self._max_t) < self._max_t
            ):
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    return ReplayAwareASHA(**kwargs)


def study_from_searcher_state(data: bytes):
    """The Optuna study in a searcher-state-*.pkl Tune saved (unpickling: trusted storage only)."""
    state = pickle.loads(data)
    # "_ot_study": sweeps run before the study was ours (ray 2.60's own attribute)
    return state["study"] if "study" in state else state["_ot_study"]


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Tune copying AWS keys from the driver's environment into each trial's runtime env.

    Ray's runtime-env agent logs every runtime env it sets up, so copied keys end up in plain
    text in the session logs. They are not needed: a local Ray's workers inherit the driver's
    environment through the raylet, and on a cluster nodes use their instance role (remem
    never forwards keys; see `remem sweep submit`). Tune reads the set on each use.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(CREDENTIAL_ENV_VARS)
