"""What a sweep produced, read back from storage: per-trial rows, the best student, teacher reuse."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from remem_ray.checkpoint_files import best_checkpoint
from remem_ray.config import SweepSpec
from remem_ray.contract import (
    BEST_TEST_ACC,
    EPOCH,
    METRIC,
    STUDENT_KEY,
    STUDENT_REPLAYED,
    TEACHER_KEY,
    TEACHER_MI,
    TEACHER_TRAINED,
    TEACHER_VAL_ACC,
    best_trial,
    stopped_early,
)
from remem_ray.errors import ResourceError
from remem_ray.search_params import SEARCH_PARAMS
from remem_ray.sweep.layout import ERROR_FILE, SUMMARY_FILE, SweepLayout
from remem_ray.sweep.search import space_size

ENDED_STATES = ("TERMINATED", "ERROR")  # Tune's states of a trial that will not run again in this sweep


@dataclass
class TrialRow:
    trial_id: str
    state: str
    params: dict[str, Any]
    epochs_done: int | None = None
    student_val_acc: float | None = None
    student_test_acc: float | None = None
    teacher_val_acc: float | None = None
    teacher_mi: float | None = None
    teacher_key: str | None = None
    teacher_trained: bool | None = None
    student_key: str | None = None
    student_replayed: bool | None = None  # True: the curve of a stored student, replayed; no Train run
    stopped_early: bool = False
    student_checkpoint: str | None = None
    last_report_at: float | None = None  # when its last result's run ended (see ended_at)
    failure: str | None = None  # a failed trial's exception, one line (its error.txt has the traceback)


@dataclass
class SweepSummary:
    name: str
    experiment: str
    metric: str
    trials: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    teacher_trainings_performed: int = 0
    teacher_reuses: int = 0
    students_distilled: int = 0  # trials that ran a distillation (a Train run)
    students_replayed: int = 0  # trials that replayed a student stored by an earlier trial or sweep
    distinct_teacher_keys: int = 0
    corrupt_checkpoints_retrained: int = 0
    integrity_events: list[dict[str, Any]] = field(default_factory=list)
    duplicate_suggestions: int = 0  # searcher suggestions of a point already run, answered, never run again
    space_size: int | None = None  # distinct points the space has (None: a continuous range)
    space_exhausted: bool = False  # every point run: the sweep ended before num_samples trials
    unfinished: int = 0  # trials asked for that have not ended (running, pending, not started): interrupted

    @property
    def interrupted(self) -> bool:
        return self.unfinished > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _row(trial, layout: SweepLayout) -> TrialRow:
    result = trial.last_result or {}
    row = TrialRow(
        trial_id=trial.trial_id,
        state=trial.status,
        params={k: trial.config[k] for k in SEARCH_PARAMS if k in trial.config},
    )
    if trial.status == "ERROR":
        row.failure = _failure_of(layout, trial.trial_id)
    if METRIC in result:
        row.epochs_done = int(result.get(EPOCH, 0))
        row.student_val_acc = _num(result.get(METRIC))
        row.student_test_acc = _num(result.get(BEST_TEST_ACC))
        row.teacher_val_acc = _num(result.get(TEACHER_VAL_ACC))
        row.teacher_mi = _num(result.get(TEACHER_MI))
        row.teacher_key = result.get(TEACHER_KEY)
        row.teacher_trained = bool(result.get(TEACHER_TRAINED))
        row.student_key = result.get(STUDENT_KEY)
        row.student_replayed = bool(result.get(STUDENT_REPLAYED))
        row.stopped_early = trial.status == "TERMINATED" and stopped_early(result)  # not a failed or running one
        row.student_checkpoint = best_checkpoint(layout.student(trial.trial_id))
        row.last_report_at = ended_at(result)
    return row


def stopped_note(row: TrialRow) -> str:
    """What a best row's score is, where the scheduler stopped its student early: its score at
    the epoch it reached, which a finished student may have passed by its last."""
    return f"; stopped early after student epoch {row.epochs_done}" if row.stopped_early else ""


def _failure_of(layout: SweepLayout, trial_id: str) -> str | None:
    from remem_ray.sweep.progress import failure_line

    try:
        return failure_line(layout.trial_folder(trial_id).read_text(ERROR_FILE))
    except ResourceError:  # none written, or storage not answering: the state says ERROR either way
        return None


def ended_at(result: dict[str, Any]) -> float | None:
    """When the run behind a trial's last result ended: Tune's timestamp of that result, or, for a
    final result a restarted run sent again (`replayed`), the end of the epoch it reports."""
    if result.get("replayed") and result.get("epoch_started_at") is not None:
        return _num(result["epoch_started_at"] + result.get("epoch_seconds", 0.0))
    return _num(result.get("timestamp"))


def load_trials(layout: SweepLayout) -> list:
    from ray.tune import ExperimentAnalysis

    from remem_ray.sweep.tune_state import newest_save, read_settled

    newest = newest_save(layout.experiment)  # the newest driver's, not the greatest name (Tune's pick)
    path = layout.experiment.path(newest) if newest else layout.experiment.path()
    try:  # none yet, or one Tune is rewriting in place (ValueError, RuntimeError): looked at again
        analysis = read_settled(
            lambda: ExperimentAnalysis(path, storage_filesystem=layout.root.fs), (ValueError, RuntimeError)
        )
    except FileNotFoundError:
        return []
    except (ValueError, RuntimeError) as exc:
        states = [n for n in layout.experiment.list_dir() if n.startswith("experiment_state-")]
        if not states:  # no trial saved yet
            return []
        # one there but unreadable: an empty table would pass for a sweep without trials (and a
        # report written from it would replace the good one)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(
            f"sweep: Tune's experiment state in {layout.experiment.uri()} cannot be read ({reason})"
        ) from None
    return sorted(analysis.trials, key=lambda t: t.trial_id)


def summarize(spec: SweepSpec, layout: SweepLayout, trials: list | None = None) -> SweepSummary:
    """The sweep's summary from its stored trials (`trials`: those already loaded by the caller)."""
    trials = load_trials(layout) if trials is None else trials
    rows = [_row(t, layout) for t in trials]
    # students a trial finished (its last epoch, or stopped by ASHA): not one still distilling
    # (`sweep status` mid-sweep), nor the part one that failed distilled
    scored = [r for r in rows if r.student_val_acc is not None and r.state == "TERMINATED"]
    ended = [r for r in rows if r.state in ENDED_STATES]
    best_id = best_trial((t.trial_id, t.status, t.last_result) for t in trials)
    best = next((r for r in rows if r.trial_id == best_id), None)
    trained = set(layout.teacher_trainings())
    events = sorted(layout.integrity_events(), key=lambda e: e["time"])
    keys = {r.teacher_key for r in scored if r.teacher_key and not r.student_replayed}  # teachers it needed
    size = space_size(spec)
    return SweepSummary(
        name=spec.name,
        experiment=layout.experiment.uri(),
        metric=f"student {METRIC}",
        trials=rows,
        best=best,
        teacher_trainings_performed=len(trained),
        teacher_reuses=sum(1 for r in scored if not r.teacher_trained and not r.student_replayed),
        students_distilled=sum(1 for r in scored if not r.student_replayed),
        students_replayed=sum(1 for r in scored if r.student_replayed),
        distinct_teacher_keys=len(keys),
        corrupt_checkpoints_retrained=len(events),
        integrity_events=events,
        duplicate_suggestions=_duplicates_answered(layout),
        space_size=size,
        space_exhausted=size is not None and spec.sweep.num_samples > len(rows) >= size,
        unfinished=max(0, expected_trials(spec) - len(ended)),
    )


def no_student_yet(summary: SweepSummary) -> str:
    """Why a sweep has no best student to show: what its trials are doing instead."""
    states = [r.state for r in summary.trials]
    running, failed = sum(s not in ENDED_STATES for s in states), states.count("ERROR")
    return f"sweep: {summary.name} has no finished student yet ({running} running or pending, {failed} failed)"


def expected_trials(spec: SweepSpec) -> int:
    """The trials a sweep runs: num_samples, or every point of a smaller finite space (no point
    runs twice, so the search ends when the space runs out)."""
    size = space_size(spec)
    return spec.sweep.num_samples if size is None else min(spec.sweep.num_samples, size)


def _duplicates_answered(layout: SweepLayout) -> int:
    """Optuna trials the searcher answered as duplicates, from its newest snapshot (0 before one)."""
    from remem_ray.sweep.distinct import DUPLICATE_OF
    from remem_ray.sweep.study import newest_study

    study = newest_study(layout)
    return 0 if study is None else sum(1 for t in study.trials if DUPLICATE_OF in t.user_attrs)


def write_summary(layout: SweepLayout, summary: SweepSummary) -> None:
    layout.experiment.write_text(SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2, sort_keys=True))


def fmt_value(value: float | None, digits: int = 4) -> str:
    # small values (a learning rate) in g, or they read 0.000; zero itself as its column reads
    return "-" if value is None else f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


def _fmt_param(value: Any) -> str:
    if value is None or isinstance(value, int):
        return "-" if value is None else str(value)
    if abs(value - round(value, 3)) < 1e-12:  # a grid's value: 3 decimals, as its column reads
        return fmt_value(value, 3)
    # significant digits: 3 decimals showed student_lr 0.0012 and 0.0014 both as 0.001
    return fmt_value(value, 3) if abs(value) < 1e-3 else f"{value:.3g}"


def format_table(summary: SweepSummary) -> str:
    # the method's own (searched by default) always; the others where some trial searched them
    searched = [
        p
        for p in SEARCH_PARAMS.values()
        if p.default is not None or p.saved_epoch or any(p.name in r.params for r in summary.trials)
    ]
    header = [
        "trial",
        "state",
        *(p.label for p in searched),
        "epochs",
        "student_val",
        "student_test",
        "teacher_val",
        "teacher_mi",
        "teacher",
        "student",
    ]
    lines = [header]
    for r in summary.trials:
        teacher = "-" if r.teacher_trained is None else ("trained" if r.teacher_trained else "reused")
        student = "-" if r.student_replayed is None else ("replayed" if r.student_replayed else "distilled")
        if r.student_replayed:
            teacher = "-"  # a replay needs no teacher
        state = r.state + (" (stopped)" if r.stopped_early else "")
        lines.append(
            [
                r.trial_id,
                state,
                *(_fmt_param(r.params.get(p.name)) for p in searched),
                str(r.epochs_done or "-"),
                fmt_value(r.student_val_acc),
                fmt_value(r.student_test_acc),
                fmt_value(r.teacher_val_acc),
                fmt_value(r.teacher_mi, 3),
                teacher,
                student,
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.append(
        f"teachers trained: {summary.teacher_trainings_performed}, reused by trials: "
        f"{summary.teacher_reuses}, distinct teachers of the distilled students: {summary.distinct_teacher_keys}"
    )
    out.append(
        f"students distilled: {summary.students_distilled}, replayed from the student registry: "
        f"{summary.students_replayed}"
    )
    if summary.duplicate_suggestions:
        out.append(
            f"duplicate suggestions answered from the trial of the same point: {summary.duplicate_suggestions} "
            "(no point runs twice)"
        )
    if summary.space_exhausted:
        out.append(f"search space exhausted: all {summary.space_size} distinct points ran")
    if summary.corrupt_checkpoints_retrained:
        out.append(f"corrupt teacher checkpoints found and retrained: {summary.corrupt_checkpoints_retrained}")
    if summary.best is not None:
        b = summary.best
        out.append(
            f"best: trial {b.trial_id} {json.dumps(b.params)} student val {fmt_value(b.student_val_acc)} "
            f"test {fmt_value(b.student_test_acc)} (teacher val {fmt_value(b.teacher_val_acc)}){stopped_note(b)}"
        )
        out.append(f"best student checkpoint: {b.student_checkpoint}")
    return "\n".join(out)
