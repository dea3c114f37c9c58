"""The search-parameter registry: adding a searchable parameter is one entry."""

from __future__ import annotations

import optuna
import pytest

from remem_ray.config import SweepSpec, field_bounds, parse_spec
from remem_ray.contract import METRIC
from remem_ray.errors import SpecError
from remem_ray.search_params import SEARCH_PARAMS, SearchParam, register
from remem_ray.sweep.results import SweepSummary, TrialRow, format_table
from remem_ray.sweep.search import DefineByRunSpace, _typed_point


@pytest.fixture
def kd_weight():
    """A parameter the registry does not have: the KD term's share."""
    param = register(SearchParam("kd_weight", "student.kd.weight", "kd_w", "KD weight (fraction)"))
    yield param
    del SEARCH_PARAMS[param.name]


def _raw(search: dict, points: list | None = None) -> dict:
    return {
        "teacher": {"epochs": 4, "checkpoint_epochs": [2, 4]},
        "student": {"epochs": 2},
        "sweep": {"search": search, "points_to_evaluate": points or []},
    }


def test_bounds_come_from_the_run_field_a_parameter_sets():
    assert str(field_bounds("teacher.rho")) == "[0, 10]"
    assert str(field_bounds("teacher.alpha")) == "(0, 1]"
    assert str(field_bounds("student.kd.temperature")) == "(0, 100]"


def test_adding_a_searchable_parameter_is_one_entry(kd_weight):
    spec = parse_spec(
        SweepSpec,
        _raw(
            {"kd_weight": {"low": 0.5, "high": 0.9}}, [{"rho": 0.0, "alpha": 1.0, "teacher_epoch": 4, "kd_weight": 0.7}]
        ),
    )
    # validation: the field's own bounds ([0, 1]), points inside the space, unknown names refused
    with pytest.raises(SpecError, match=r"sweep.search: kd_weight: values must lie in \[0, 1\]"):
        parse_spec(SweepSpec, _raw({"kd_weight": {"low": 0.5, "high": 1.5}}))
    with pytest.raises(SpecError, match=r"points_to_evaluate.0.kd_weight: 0.95 is outside sweep.search.kd_weight"):
        parse_spec(SweepSpec, _raw({"kd_weight": {"low": 0.5, "high": 0.9}}, [{"kd_weight": 0.95}]))
    # the Optuna space samples it, points keep their types
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trial = study.ask()
    DefineByRunSpace(spec)(trial)
    assert 0.5 <= trial.params["kd_weight"] <= 0.9 and set(trial.params) == {
        "rho",
        "alpha",
        "kd_weight",
        "teacher_epoch",
    }
    assert _typed_point({"kd_weight": 1, "teacher_epoch": 4.0}) == {"kd_weight": 1.0, "teacher_epoch": 4}
    # a trial's value lands in the run spec
    run = spec.run_spec({"rho": 0.05, "alpha": 0.9, "teacher_epoch": 2, "kd_weight": 0.6})
    assert run.student.kd.weight == 0.6 and run.teacher.rho == 0.05 and run.student.teacher_epoch == 2
    # the summary table has its column
    summary = SweepSummary(
        "s",
        "/x",
        METRIC,
        trials=[TrialRow("t1", "TERMINATED", {"rho": 0.05, "alpha": 0.9, "teacher_epoch": 2, "kd_weight": 0.6})],
    )
    header, row = format_table(summary).splitlines()[:2]
    assert header.split()[2:6] == ["rho", "alpha", "t_epoch", "kd_w"]
    assert row.split()[2:6] == ["0.050", "0.900", "2", "0.600"]


def test_an_unknown_search_parameter_is_named():
    with pytest.raises(SpecError, match="sweep.search: unknown parameter 'beta'"):
        parse_spec(SweepSpec, _raw({"beta": {"values": [1.0]}}))
