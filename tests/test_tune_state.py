"""Which of Tune's saves a resume restores when its drivers' clocks were in different zones."""

from __future__ import annotations

import json

from remem_ray.storage import Storage
from remem_ray.sweep.tune_state import name_newest_state_last

LAPTOP_START = 1_765_069_200.0  # 2025-12-07 01:00 UTC: 09:00 on a laptop at UTC+8
NODE_START = LAPTOP_START + 2 * 3600  # the resume, 03:00 on a node in UTC


def _saves(folder: Storage, session: str, start: float | None) -> None:
    stats = {"start_time": start} if start is not None else {}
    folder.write_text(f"experiment_state-{session}.json", json.dumps({"trial_data": [], "stats": stats}))
    folder.write_bytes(f"searcher-state-{session}.pkl", session.encode())
    folder.write_text(f"search_gen_state-{session}.json", json.dumps({"session": session}))
    folder.write_bytes(f"callback-states-{session}.pkl", session.encode())


def test_a_resume_restores_the_newest_drivers_saves_not_the_greatest_name(tmp_path):
    """Tune restores the greatest name, and names by local start time: the laptop's 09:00 sorted
    after the node's 03:00, two hours later, and every resume and status read the laptop's."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.study import newest_snapshot

    layout = SweepLayout(Storage(str(tmp_path)), "s")
    experiment = layout.experiment
    _saves(experiment, "2025-12-06_23-00-00", LAPTOP_START - 3 * 3600)  # an earlier run, in UTC
    _saves(experiment, "2025-12-07_09-00-00", LAPTOP_START)
    _saves(experiment, "2025-12-07_03-00-00", NODE_START)
    line = name_newest_state_last(experiment)
    assert line is not None and "2025-12-07_09-00-00" in line and "superseded-" in line
    newest = _find_newest_experiment_checkpoint(experiment.path())  # Tune's own choice, now
    assert newest is not None and newest.endswith("experiment_state-2025-12-07_03-00-00.json")
    assert newest_snapshot(layout) == b"2025-12-07_03-00-00"  # the study read from the same driver's save
    kept = sorted(experiment.list_dir())
    moved = {f"superseded-{kind}2025-12-07_09-00-00" for kind in ("searcher-state-", "search_gen_state-")}
    assert moved <= {name.rsplit(".", 1)[0] for name in kept} and len(kept) == 12
    assert name_newest_state_last(experiment) is None  # in order now: nothing moves


def test_saves_in_order_or_unreadable_are_left_as_they_are(tmp_path):
    experiment = Storage(str(tmp_path))
    _saves(experiment, "2025-12-07_01-00-00", LAPTOP_START)
    _saves(experiment, "2025-12-07_03-00-00", NODE_START)
    before = sorted(experiment.list_dir())
    assert name_newest_state_last(experiment) is None and sorted(experiment.list_dir()) == before
    _saves(experiment, "2025-12-07_09-00-00", None)  # no start in it (not Tune's, or cut short): not judged
    assert name_newest_state_last(experiment) is None
