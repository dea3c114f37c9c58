"""The contract between the sweep and the loops: settings that survive the trip to a Ray Train
worker as plain data, and the one rule that picks the kept student."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from remem_ray.config import load_run_spec
from remem_ray.contract import METRIC, LoopConfig, PhasesConfig, best_trial, stopped_early
from remem_ray.leases import LeaseHandle

ROOT = Path(__file__).resolve().parents[1]


def _teacher(tmp_path) -> LoopConfig:
    spec = load_run_spec(None, {"teacher.epochs": 3, "teacher.checkpoint_epochs": [3]})
    lease = LeaseHandle(str(tmp_path / "lease"), None, "us-east-1", 2, "token")
    return LoopConfig(spec, str(tmp_path / "t"), state=str(tmp_path / "t" / "resume"), lease=lease, label="x")


def _done() -> None:
    pass


def test_a_config_travels_as_plain_data_and_comes_back_equal(tmp_path):
    teacher = _teacher(tmp_path)
    student = LoopConfig(teacher.spec, str(tmp_path / "s"), teacher_checkpoint="t/epoch_3", report_extra={"a": 1})
    phases = PhasesConfig(teacher, student, on_teacher_done=_done)
    data = phases.to_dict()
    plain = {k: v for k, v in data.items() if k != "on_teacher_done"}
    assert json.loads(json.dumps(plain)) == plain  # nothing but JSON types for Train's controller
    assert isinstance(data["on_teacher_done"], bytes)
    back = PhasesConfig.from_dict(data)
    assert back.teacher == teacher and back.student == student
    assert back.teacher_done_hook() is _done  # unpickled by reference where it runs
    assert PhasesConfig.from_dict(PhasesConfig(teacher).to_dict()).student is None


def test_an_in_process_session_never_travels(tmp_path):
    with pytest.raises(ValueError, match="session"):
        _teacher(tmp_path).but(session=object()).to_dict()


def test_a_config_is_frozen(tmp_path):
    config = _teacher(tmp_path)
    with pytest.raises(AttributeError):
        config.output = "elsewhere"  # type: ignore[misc]
    assert config.but(quiet=True).quiet and not config.quiet


def test_the_kept_student_is_the_best_finished_never_an_errored_one():
    def result(score, epoch=3):
        return {METRIC: score, "epoch": epoch, "epochs": 3}

    assert best_trial([("a", "TERMINATED", result(0.7)), ("b", "ERROR", result(0.9))]) == "a"
    # a tie: a finished student before a stopped one, then the first id
    assert best_trial([("b", "TERMINATED", result(0.8, 1)), ("c", "TERMINATED", result(0.8))]) == "c"
    assert best_trial([("z", "TERMINATED", result(0.8)), ("y", "TERMINATED", result(0.8))]) == "y"
    assert best_trial([("a", "TERMINATED", result(float("nan"))), ("b", "RUNNING", None)]) is None
    assert stopped_early(result(0.5, 1)) and not stopped_early(result(0.5)) and not stopped_early({})


def test_the_kept_student_is_never_a_running_trials_but_the_live_best_so_far_may_be():
    """A running trial's score may still change and its student is not saved yet: `sweep best`
    and export picked it (and export then refused it) while finished trials were there."""

    def result(score, epoch=2):
        return {METRIC: score, "epoch": epoch, "epochs": 3}

    trials = [("a", "TERMINATED", result(0.9, 3)), ("b", "RUNNING", result(0.95))]
    assert best_trial(trials) == "a"
    assert best_trial(trials, live=True) == "b"
    assert best_trial([("b", "RUNNING", result(0.95)), ("c", "PENDING", None)]) is None


def test_the_metric_and_the_loop_settings_are_spelled_in_the_contract_only():
    sources = [p for d in ("remem_ray", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    spelled = [p.relative_to(ROOT).as_posix() for p in sources if f'"{METRIC}"' in p.read_text()]
    assert spelled == ["remem_ray/contract.py"]
    others = [p for p in sources if p.name != "contract.py"]
    for key in [f.name for f in fields(LoopConfig)] + [f.name for f in fields(PhasesConfig)]:
        if key in (
            "spec",
            "output",
            "state",
            "lease",
            "label",
            "quiet",
            "session",
            "teacher",
            "student",
            "tensorboard",
            "teacher_checkpoint",  # also StudentConfig.teacher_checkpoint (the student key leaves it out)
        ):
            continue  # words also used as folder names or spec fields; typed fields keep them honest
        users = [p.relative_to(ROOT).as_posix() for p in others if f'"{key}"' in p.read_text()]
        assert users == [], key
