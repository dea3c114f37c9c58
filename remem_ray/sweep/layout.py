"""Where a sweep's things live under the one storage root.

    <root>/sweeps/<name>/                  the Ray Tune experiment (Tuner.restore works on it)
    <root>/sweeps/<name>/sweep_spec.json   the validated spec (resume rebuilds the trial from it)
    <root>/sweeps/<name>/summary.json      written at the end of run and resume
    <root>/sweeps/<name>/students/<trial>/best/   each trial's best student
    <root>/sweeps/<name>/train-runs/student-<trial>/   the students' Ray Train runs
    <root>/sweeps/<name>/teacher-trainings/<key>.json  teachers this sweep trained
    <root>/teachers/<key>/                 the teacher registry, shared by sweeps on this root
"""

from __future__ import annotations

import json
import time

from remem_ray.storage import Storage

SPEC_FILE = "sweep_spec.json"
SUMMARY_FILE = "summary.json"


class SweepLayout:
    def __init__(self, storage: Storage, name: str) -> None:
        self.root = storage
        self.name = name
        self.experiment = storage.child("sweeps", name)
        self.teachers = storage.child("teachers")
        self.train_runs = self.experiment.child("train-runs")

    def student(self, trial_id: str) -> Storage:
        return self.experiment.child("students", trial_id)

    def record_teacher_training(self, key: str, trial_id: str) -> None:
        self.experiment.write_text(f"teacher-trainings/{key}.json",
                                   json.dumps({"teacher_key": key, "trial_id": trial_id, "time": time.time()}))

    def trained_by(self, key: str) -> str | None:
        """The trial of this sweep that trained teacher `key`, if one did."""
        rel = f"teacher-trainings/{key}.json"
        return json.loads(self.experiment.read_text(rel))["trial_id"] if self.experiment.is_file(rel) else None

    def teacher_trainings(self) -> list[str]:
        return [n[: -len(".json")] for n in self.experiment.list_dir("teacher-trainings") if n.endswith(".json")]
