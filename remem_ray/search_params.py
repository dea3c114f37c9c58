"""The searchable parameters: one entry each, read by spec validation (names, defaults, bounds),
the Optuna space, the run spec a trial performs, the summary table and the report's plots.

Adding a searchable parameter is one `register(SearchParam(...))`: its bounds are those of the
run-spec field it sets (so a sampled value is always a valid run), its values land there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchParam:
    name: str  # the key under sweep.search and in points_to_evaluate, trial configs and summary rows
    target: str  # dotted path of the run-spec field a trial's value is written to
    label: str  # column header in the summary table
    axis: str  # plot axis label, with its unit
    default: tuple[float, ...] | None = None  # searched over these values unless the spec says; None: only if given
    note: str = ""  # said after the bounds in errors, e.g. what the end value means
    saved_epoch: bool = False  # a choice among the teacher's saved epochs (integers), not a range

    def cast(self, value: float) -> float | int:
        return int(value) if self.saved_epoch else float(value)


SEARCH_PARAMS: dict[str, SearchParam] = {}


def register(param: SearchParam) -> SearchParam:
    SEARCH_PARAMS[param.name] = param
    return param


# one row a parameter
# fmt: off
for _param in (
    SearchParam("rho", "teacher.rho", "rho", "SAM radius rho (dimensionless)", (0.0, 0.05, 0.1),
                "0 = plain fine-tuning"),
    SearchParam("alpha", "teacher.alpha", "alpha", "MLP reweighting alpha (dimensionless)", (1.0, 0.9, 0.8),
                "1 = the stock model"),
    SearchParam("teacher_epoch", "student.teacher_epoch", "t_epoch", "teacher checkpoint (epoch)", saved_epoch=True),
    SearchParam("student_lr", "student.optimizer.lr", "student_lr", "student learning rate"),
    SearchParam("kd_temperature", "student.kd.temperature", "kd_T", "KD temperature (dimensionless)"),
):
    register(_param)
# fmt: on
RHO, ALPHA, TEACHER_EPOCH = SEARCH_PARAMS["rho"], SEARCH_PARAMS["alpha"], SEARCH_PARAMS["teacher_epoch"]


def ranged_params() -> list[SearchParam]:
    """The parameters searched over a range or a list of values (all but the checkpoint choice)."""
    return [p for p in SEARCH_PARAMS.values() if not p.saved_epoch]
