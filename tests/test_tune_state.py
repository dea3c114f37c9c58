"""Which of Tune's saves is a sweep's state when its drivers' clocks were in different zones."""

from __future__ import annotations

import json

from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.tune_state import SUPERSEDED, name_newest_state_last, newest_save

LAPTOP_START = 1_765_069_200.0  # 2025-12-07 01:00 UTC: 09:00 on a laptop at UTC+8
NODE_START = LAPTOP_START + 2 * 3600  # the resume, 03:00 on a node in UTC
LAPTOP, NODE = "2025-12-07_09-00-00", "2025-12-07_03-00-00"
KINDS = (("experiment_state-", ".json"), ("search_gen_state-", ".json"), ("searcher-state-", ".pkl"))


def _saves(folder: Storage, session: str, start: float | None) -> None:
    stats = {"start_time": start} if start is not None else {}
    folder.write_text(f"experiment_state-{session}.json", json.dumps({"trial_data": [], "stats": stats}))
    folder.write_text(f"search_gen_state-{session}.json", json.dumps({"session": session}))
    folder.write_bytes(f"searcher-state-{session}.pkl", session.encode())


def test_readers_take_the_newest_drivers_saves_and_a_resume_moves_the_older_ones_aside(tmp_path):
    """Tune names its saves by its start in local time and takes the greatest name: the laptop's
    09:00 sorts after the node's 03:00, two hours later. After the first resume on the node (one
    save to restore: Tune's pick is right), status, the summary and the study's copy kept reading
    the laptop's saves; a second resume restored them (trials ran again, the searcher set back)."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    from remem_ray.sweep.study import newest_snapshot

    layout = SweepLayout(Storage(str(tmp_path / "root")), "s")
    experiment = layout.experiment
    _saves(experiment, LAPTOP, LAPTOP_START)
    assert name_newest_state_last(experiment) is None  # the first resume restores the only save
    _saves(experiment, NODE, NODE_START)  # the resumed driver's saves
    assert newest_save(experiment) == f"experiment_state-{NODE}.json"  # the readers' pick
    assert newest_snapshot(layout) == NODE.encode()  # the study's copy, from the same driver
    # the next resume, on the same node and Ray session: Tune's staging folder holds both
    staging = tmp_path / "session" / "driver_artifacts"
    staging.mkdir(parents=True)
    for prefix, suffix in KINDS:
        for session in (LAPTOP, NODE):
            (staging / f"{prefix}{session}{suffix}").write_text("")
    line = name_newest_state_last(experiment, [staging])
    assert line is not None and LAPTOP in line and SUPERSEDED in line
    newest = _find_newest_experiment_checkpoint(experiment.path())  # Tune's own pick now
    assert newest is not None and newest.endswith(f"experiment_state-{NODE}.json")
    assert sorted(p.name for p in staging.iterdir()) == sorted(f"{prefix}{NODE}{suffix}" for prefix, suffix in KINDS)
    assert {n for n in experiment.list_dir() if n.startswith(SUPERSEDED)} == {
        f"{SUPERSEDED}experiment_state-{LAPTOP}.json",
        f"{SUPERSEDED}search_gen_state-{LAPTOP}.json",
        f"{SUPERSEDED}searcher-state-{LAPTOP}.pkl",
    }
    assert name_newest_state_last(experiment) is None  # in order now: nothing moves


def test_a_move_cut_short_is_finished_by_the_next_resume_and_saves_in_order_stay(tmp_path):
    experiment = Storage(str(tmp_path))
    _saves(experiment, "2025-12-07_01-00-00", LAPTOP_START)
    _saves(experiment, NODE, NODE_START)
    before = sorted(experiment.list_dir())
    assert name_newest_state_last(experiment) is None and sorted(experiment.list_dir()) == before
    # a move of the laptop's saves stopped after its experiment state (moved last) was not reached,
    # or after it was: either way the next resume moves what is left
    _saves(experiment, LAPTOP, LAPTOP_START - 3600)
    experiment.delete_file(f"experiment_state-{LAPTOP}.json")
    assert name_newest_state_last(experiment) is not None
    assert not [n for n in experiment.list_dir() if LAPTOP in n and not n.startswith(SUPERSEDED)]
    # an experiment state without a start (not Tune's, or cut short) is not judged
    _saves(experiment, "2025-12-07_23-00-00", None)
    assert name_newest_state_last(experiment) is None


def test_an_experiment_state_caught_half_written_is_read_again(tmp_path, monkeypatch):
    """Tune copies its state over the old one while it runs: read mid-copy, the newest driver's
    state is not JSON, and the readers took an older driver's saves for that look."""
    from remem_ray.sweep import tune_state

    monkeypatch.setattr(tune_state, "SETTLE_PAUSE_S", 0.0)
    experiment = Storage(str(tmp_path))
    _saves(experiment, LAPTOP, LAPTOP_START)
    _saves(experiment, NODE, NODE_START)
    real, reads = experiment.read_text, []

    def mid_copy(rel):
        reads.append(rel)
        text = real(rel)
        return text[: len(text) // 2] if NODE in rel and reads.count(rel) == 1 else text

    monkeypatch.setattr(experiment, "read_text", mid_copy)
    assert newest_save(experiment) == f"experiment_state-{NODE}.json"
