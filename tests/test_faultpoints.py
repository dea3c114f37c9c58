"""Test-only fault points: a run holds at a named moment until released (remem_ray.faultpoints)."""

from __future__ import annotations

import json
import os
import threading
import time

from remem_ray.faultpoints import HOLD_AT, HOLD_DIR, hold_if_asked


def test_unset_or_other_points_do_not_hold(tmp_path, monkeypatch):
    hold_if_asked("student", 2, "/r/sweeps/a/students/t1")  # unset
    monkeypatch.setenv(HOLD_AT, "teacher:2,student:3,student:2@/sweeps/b/")
    monkeypatch.setenv(HOLD_DIR, str(tmp_path))
    hold_if_asked("student", 2, "/r/sweeps/a/students/t1")  # other role/epoch, or another sweep's run
    assert os.listdir(tmp_path) == []


def test_the_first_run_at_a_point_claims_it_and_waits_for_release(tmp_path, monkeypatch):
    monkeypatch.setenv(HOLD_AT, "student:2@/sweeps/b/")
    monkeypatch.setenv(HOLD_DIR, str(tmp_path))
    released = threading.Event()

    def run():
        hold_if_asked("student", 2, "/r/sweeps/b/students/t1")
        released.set()

    held = threading.Thread(target=run, daemon=True)
    held.start()
    claimed = tmp_path / "student-2.claimed"
    while not claimed.exists() or not claimed.read_text():
        time.sleep(0.05)
    assert json.loads(claimed.read_text()) == {"pid": os.getpid(), "output": "/r/sweeps/b/students/t1"}
    hold_if_asked("student", 2, "/r/sweeps/b/students/t2")  # claimed already: a second run passes
    assert not released.is_set()  # the first still waits: only the release file lets it go
    (tmp_path / "student-2.release").touch()
    held.join(timeout=30)
    assert released.is_set()
