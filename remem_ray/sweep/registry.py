"""Teacher registry: <root>/teachers/<teacher_key>/ holds a teacher's checkpoints and its resume
state (so whichever trial trains it next resumes it), shared by every sweep on the root.

    <key>/spec.json, epoch_<e>/        the first training's checkpoints
    <key>/resume/state.pt              its resume state (remem_ray.train.phases)
    <key>/train-run/                   its Ray Train run, where the teacher trains in a run of its own
    <key>/lease/<generation>.json      who trains this key now (remem_ray.leases)
    <key>/retrain.json                 the newest retraining scheduled (after a corrupt checkpoint)
    <key>/retrain-<n>/epoch_<e>/       that retraining's checkpoints (and resume/), beside the old ones
    <key>/active.json                  which set of checkpoints is in use (absent: the first)

Exactly one trial, of any sweep, trains a key at a time: the holder of the key's lease in
storage; the others wait for the checkpoints to appear. A retraining writes beside the
checkpoints in use, which trials may be reading, and one write of active.json switches
readers over once it is finished.
"""

from __future__ import annotations

import json
import threading

from remem_ray.checkpoint_files import checkpoint_name, is_complete, verify_checkpoint
from remem_ray.leases import Lease
from remem_ray.storage import Storage

TRAIN_RUN = "train-run"
LEASE_DIR = "lease"
RETRAIN_FILE = "retrain.json"
ACTIVE_FILE = "active.json"


class TeacherRegistry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def folder(self, key: str) -> Storage:
        """The key's root: Train runs, lease, markers."""
        return self.storage.child(key)

    def lease(self, key: str, holder: str, stale_after_s: float) -> Lease:
        return Lease(self.folder(key).child(LEASE_DIR), holder, stale_after_s)

    # ------------------------------------------------------------- checkpoints in use
    def _active_subdir(self, key: str) -> str:
        folder = self.folder(key)
        return json.loads(folder.read_text(ACTIVE_FILE))["folder"] if folder.is_file(ACTIVE_FILE) else ""

    def checkpoints(self, key: str) -> Storage:
        """Where the checkpoints in use live."""
        return self.folder(key).child(self._active_subdir(key))

    def checkpoint_uri(self, key: str, epoch: int) -> str:
        return self.checkpoints(key).uri(checkpoint_name(epoch))

    def has_all(self, key: str, epochs: list[int]) -> bool:
        folder = self.checkpoints(key)
        return all(is_complete(folder, checkpoint_name(e)) for e in epochs)

    def verify(self, key: str, epoch: int) -> str | None:
        """None if that checkpoint is whole, else the problem (checked against its manifest's sha256)."""
        return verify_checkpoint(self.checkpoints(key), checkpoint_name(epoch))

    # ------------------------------------------------------------- training and retraining
    def pending_retrain(self, key: str) -> dict | None:
        """The retraining scheduled and not yet switched to, if any."""
        folder = self.folder(key)
        if not folder.is_file(RETRAIN_FILE):
            return None
        retrain = json.loads(folder.read_text(RETRAIN_FILE))
        # a retrain.json without a folder is from a version that retrained in place
        return None if retrain.get("folder", "") == self._active_subdir(key) else retrain

    def training_output(self, key: str) -> Storage:
        """Where the next training writes: a pending retraining's own folder, else the key's root."""
        retrain = self.pending_retrain(key)
        return self.folder(key).child(retrain["folder"]) if retrain else self.folder(key)

    def train_run_name(self, key: str) -> str:
        """The teacher-only Train run (teacher and student on different workers); a retraining has its own."""
        retrain = self.pending_retrain(key)
        return retrain["train_run"] if retrain else TRAIN_RUN

    def schedule_retrain(self, key: str, epoch: int, problem: str) -> str:
        """Retrain a teacher after a corrupt checkpoint, into a new folder; nothing in use is touched.

        The marker is written first, so whoever trains next (this trial or, after a crash,
        another) resumes that same retraining (its resume state is in the new folder).
        Returns the name of its Train run, used where the teacher trains in a run of its own.
        """
        folder = self.folder(key)
        attempt = 1
        if folder.is_file(RETRAIN_FILE):
            attempt = int(json.loads(folder.read_text(RETRAIN_FILE))["attempt"]) + 1
        run = f"{TRAIN_RUN}-retrain-{attempt}"
        folder.write_text(
            RETRAIN_FILE,
            json.dumps(
                {
                    "attempt": attempt,
                    "train_run": run,
                    "folder": f"retrain-{attempt}",
                    "epoch": epoch,
                    "reason": problem,
                }
            ),
        )
        return run

    def finish_training(self, key: str, folder: str | None = None) -> None:
        """After a training ends: a finished retraining becomes the set in use (one atomic write).

        folder: the retraining's folder that training wrote; another one scheduled since (after
        this holder lost the lease) is left alone.
        """
        retrain = self.pending_retrain(key)
        if retrain is not None and folder in (None, retrain["folder"]):
            self.folder(key).write_text(
                ACTIVE_FILE, json.dumps({"folder": retrain["folder"], "train_run": retrain["train_run"]})
            )


class Heartbeat:
    """Renews a held lease from a background thread while the holder trains; `lost` is set
    (and renewing ends) once the lease has passed to another holder."""

    def __init__(self, lease: Lease, every_s: float) -> None:
        self._lease, self._every = lease, every_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            if not self._lease.renew():
                self.lost.set()
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
