"""`remem sweep export`: a sweep's student as a timm folder (remem_ray.export), with a card that
says which sweep, trial, teacher and point it came from."""

from __future__ import annotations

from remem_ray.checkpoint_files import best_location
from remem_ray.config import SweepSpec
from remem_ray.errors import NotReadyError, UserInputError
from remem_ray.export import Exported, export_student
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.results import no_student_yet, summarize


def export_trial(spec: SweepSpec, trial_id: str | None, target: str, onnx: bool = False) -> Exported:
    """The student of `trial_id` (default: the sweep's best) exported to `target`."""
    layout = SweepLayout.of(spec)
    summary = summarize(spec, layout)
    if trial_id is None:
        row = summary.best
        if row is None:
            raise NotReadyError(no_student_yet(summary))
    else:
        row = next((r for r in summary.trials if r.trial_id == trial_id), None)
        if row is None:
            known = ", ".join(r.trial_id for r in summary.trials) or "none"
            raise UserInputError(f"--trial: no trial {trial_id!r} in sweep {spec.name} (trials: {known})")
    location = best_location(layout.student(row.trial_id))  # its own, or the stored student it replayed
    if row.state != "TERMINATED" or location is None:
        what = f"trial {row.trial_id} has no finished student (state {row.state})"
        if trial_id is None:  # the best by its scores, its checkpoint gone
            raise NotReadyError(f"sweep: {spec.name}'s best {what}: name another with --trial")
        raise UserInputError(f"--trial: {what}")
    params = {**row.params}
    facts = {
        "dataset": f"{spec.data.name} ({spec.data.img_size} px)",
        "teacher": f"`{spec.teacher.model}` (key `{row.teacher_key}`)",
        "rho (SAM radius)": _described(params.get("rho", spec.teacher.rho), 0, "no SAM"),
        "alpha (MLP reweighting)": _described(params.get("alpha", spec.teacher.alpha), 1, "no reweighting"),
        "teacher epoch": params.get("teacher_epoch", spec.student.teacher_epoch or spec.teacher.saved_epochs[-1]),
        "student best val accuracy": _acc(row.student_val_acc),
        "student test accuracy there": _acc(row.student_test_acc),
        "sweep": f"{spec.name} (`{layout.experiment.uri()}`), trial {row.trial_id}",
    }
    return export_student(*location, target, facts, onnx=onnx, endpoint=spec.storage.endpoint)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _described(value, neutral, meaning: str) -> str:
    """A method parameter, said plainly where its value switches the method's part off."""
    return f"{value} ({meaning})" if value == neutral else str(value)
