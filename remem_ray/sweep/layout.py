"""Where a sweep's things live under the one storage root.

<root>/sweeps/<name>/                  the Ray Tune experiment (Tuner.restore works on it)
<root>/sweeps/<name>/sweep_spec.json   the validated spec (resume rebuilds the trial from it)
<root>/sweeps/<name>/inputs.json       what its image folder and weights files held as it began (a resume keeps it)
<root>/sweeps/<name>/summary.json      written at the end of run and resume
<root>/sweeps/<name>/sweep.log         the driver's console and every line of the cluster's output
<root>/sweeps/<name>/driver-lease/      the lease of the one driver (run or resume) driving the sweep
<root>/sweeps/<name>/tensorboard/<run>/   per-epoch scalars of each teacher and student Train run
<root>/sweeps/<name>/optuna.db         the Optuna study (SQLite), kept up to date while the sweep runs
<root>/sweeps/<name>/students/<trial>/   each trial's best student (best.json -> best_epoch_<e>/)
<root>/sweeps/<name>/train-runs/student-<trial>/   each trial's Ray Train run (its teacher too, if it trains one)
<root>/sweeps/<name>/teacher-trainings/<key>.json  teachers this sweep trained
<root>/sweeps/<name>/integrity-events/*.json       corrupt checkpoints found and retrained
<root>/teachers/<key>/                 the teacher registry, shared by sweeps on this root
<root>/students/<key>/                 the student registry (finished distillations), shared likewise
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from remem_ray.storage import Storage

if TYPE_CHECKING:
    from remem_ray.config import SweepSpec

SWEEP_SPEC_FILE = "sweep_spec.json"
INPUTS_FILE = "inputs.json"  # what the data folder and weights files held as the sweep began (remem_ray/inputs.py)
SUMMARY_FILE = "summary.json"
LOG_FILE = "sweep.log"
TUNER_FILE = "tuner.pkl"  # Tune's: written as the Tuner is created; what Tuner.can_restore looks for
ERROR_FILE = "error.txt"  # Tune's, in a failed trial's folder
GPU_SHARES_FILE = "gpu_shares.json"  # what gpus_per_worker: auto measured and chose (the driver's, rewritten on resume)


class SweepLayout:
    def __init__(self, storage: Storage, name: str) -> None:
        self.root = storage
        self.name = name
        self.experiment = storage.child("sweeps", name)
        self.teachers = storage.child("teachers")
        self.students = storage.child("students")
        self.train_runs = self.experiment.child("train-runs")

    @classmethod
    def of(cls, spec: SweepSpec) -> SweepLayout:
        """The layout of the spec's sweep under its storage root."""
        return cls(Storage.from_config(spec.storage), spec.name)

    @staticmethod
    def trial_dirname(trial_id: str) -> str:
        """Short, constant-free trial folder names (the spec never leaks into paths)."""
        return f"trial_{trial_id}"

    def trial_folder(self, trial_id: str) -> Storage:
        """Tune's folder of a trial (its results, error.txt)."""
        return self.experiment.child(self.trial_dirname(trial_id))

    def student(self, trial_id: str) -> Storage:
        """A trial's best student: best.json names its best_epoch_<e>/ here, or in the student
        registry for a trial that replayed a stored student."""
        return self.experiment.child("students", trial_id)

    def tensorboard(self, run: str) -> Storage:
        """TensorBoard event files of one Train run: teacher_<key> or trial_<id>_student."""
        return self.experiment.child("tensorboard", run)

    def record_teacher_training(self, key: str, trial_id: str, only_if_none: bool = False, **extra) -> bool:
        """Record that trial `trial_id` trained teacher `key` (False: `only_if_none` and a record
        was there already, a newer training's, which is kept)."""
        record = {"teacher_key": key, "trial_id": trial_id, "time": time.time(), **extra}
        rel, data = f"teacher-trainings/{key}.json", json.dumps(record)
        if only_if_none:
            return self.experiment.create_exclusive(rel, data.encode())
        self.experiment.write_text(rel, data)
        return True

    def teacher_training(self, key: str) -> dict | None:
        """The record of this sweep's training of teacher `key`, if it trained it."""
        rel = f"teacher-trainings/{key}.json"
        return json.loads(self.experiment.read_text(rel)) if self.experiment.is_file(rel) else None

    def trained_by(self, key: str) -> str | None:
        """The trial of this sweep that trained teacher `key`, if one did."""
        record = self.teacher_training(key)
        return record["trial_id"] if record else None

    def record_integrity_event(
        self, key: str, epoch: int, problem: str, trial_id: str, action: str, teacher_set: str = ""
    ) -> None:
        """A teacher set found broken (a checkpoint missing, corrupt or truncated): kept for summary.json."""
        record = {
            "teacher_key": key,
            "epoch": epoch,
            "problem": problem,
            "trial_id": trial_id,
            "action": action,
            "set": teacher_set,
            "time": time.time(),
        }
        self.experiment.write_text(
            f"integrity-events/{key}-epoch_{epoch}-{int(time.time() * 1000)}.json", json.dumps(record)
        )

    def integrity_event_recorded(self, key: str, teacher_set: str) -> bool:
        return any(e["teacher_key"] == key and e.get("set") == teacher_set for e in self.integrity_events())

    def integrity_events(self) -> list[dict]:
        names = [n for n in self.experiment.list_dir("integrity-events") if n.endswith(".json")]
        return [json.loads(self.experiment.read_text(f"integrity-events/{n}")) for n in names]

    def teacher_trainings(self) -> list[str]:
        return [n[: -len(".json")] for n in self.experiment.list_dir("teacher-trainings") if n.endswith(".json")]
