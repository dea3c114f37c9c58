"""Teacher registry: <root>/teachers/<teacher_key>/ holds spec.json, epoch_<e>/ checkpoints and
the teacher's own Ray Train run (so whichever trial trains it next resumes it).

Exactly one trial trains a given key at a time: it holds that key's lease in a small Ray actor
(`TeacherLeases`) that the sweep driver owns; the others wait for the checkpoints to appear.
A holder that stops heart-beating (its process died) loses the lease after `stale_after_s`.
"""

from __future__ import annotations

import threading
import time

import json

from remem_ray.checkpoints import MANIFEST_FILE, is_complete, verify_checkpoint
from remem_ray.storage import Storage
from remem_ray.train.teacher import checkpoint_name

NAMESPACE = "remem"
TRAIN_RUN = "train-run"
RETRAIN_FILE = "retrain.json"


class TeacherRegistry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def folder(self, key: str) -> Storage:
        return self.storage.child(key)

    def uri(self, key: str) -> str:
        return self.storage.uri(key)

    def checkpoint_uri(self, key: str, epoch: int) -> str:
        return self.storage.uri(key, checkpoint_name(epoch))

    def has_all(self, key: str, epochs: list[int]) -> bool:
        folder = self.folder(key)
        return all(is_complete(folder, checkpoint_name(e)) for e in epochs)

    def verify(self, key: str, epoch: int) -> str | None:
        """None if that checkpoint is whole, else the problem (checked against its manifest's sha256)."""
        return verify_checkpoint(self.folder(key), checkpoint_name(epoch))

    def train_run_name(self, key: str) -> str:
        """The teacher's Train run; a retraining gets a fresh one (the old run finished: it would resume at its end)."""
        folder = self.folder(key)
        if folder.is_file(RETRAIN_FILE):
            return json.loads(folder.read_text(RETRAIN_FILE))["train_run"]
        return TRAIN_RUN

    def schedule_retrain(self, key: str, epoch: int, problem: str) -> str:
        """Retrain a teacher after a corrupt checkpoint: a new Train run; the bad checkpoint's manifest goes.

        The marker is written first, so whoever trains next (this trial or, after a crash,
        another) resumes that same new run; the run rewrites every saved epoch.
        """
        folder = self.folder(key)
        attempt = 1
        if folder.is_file(RETRAIN_FILE):
            attempt = int(json.loads(folder.read_text(RETRAIN_FILE))["attempt"]) + 1
        run = f"{TRAIN_RUN}-retrain-{attempt}"
        folder.write_text(RETRAIN_FILE, json.dumps({"attempt": attempt, "train_run": run, "epoch": epoch,
                                                    "reason": problem}))
        manifest = f"{checkpoint_name(epoch)}/{MANIFEST_FILE}"
        if folder.is_file(manifest):
            folder.delete_file(manifest)
        return run


class LeaseTable:
    """Who trains which teacher key; plain logic, wrapped in a Ray actor by `leases_actor`."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._holders: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, stale_after_s: float) -> bool:
        current = self._holders.get(key)
        now = self._clock()
        if current is None or current[0] == holder or now - current[1] > stale_after_s:
            self._holders[key] = (holder, now)
            return True
        return False

    def heartbeat(self, key: str, holder: str) -> bool:
        current = self._holders.get(key)
        if current is not None and current[0] == holder:
            self._holders[key] = (holder, self._clock())
            return True
        return False

    def release(self, key: str, holder: str) -> None:
        current = self._holders.get(key)
        if current is not None and current[0] == holder:
            del self._holders[key]

    def holder(self, key: str) -> str | None:
        current = self._holders.get(key)
        return current[0] if current else None


def leases_actor_name(sweep_name: str) -> str:
    return f"remem-teacher-leases-{sweep_name}"


def start_leases_actor(sweep_name: str):
    """Started by the sweep driver (it owns it, so it goes when the driver goes)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=16)(LeaseTable)
    return actor_cls.options(name=leases_actor_name(sweep_name), namespace=NAMESPACE,
                             get_if_exists=True).remote()


def get_leases_actor(sweep_name: str):
    import ray

    return ray.get_actor(leases_actor_name(sweep_name), namespace=NAMESPACE)


class Heartbeat:
    """Renews a lease from a background thread while the holder trains."""

    def __init__(self, actor, key: str, holder: str, every_s: float) -> None:
        self._actor, self._key, self._holder, self._every = actor, key, holder, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._actor.heartbeat.remote(self._key, self._holder)
            except Exception:  # the driver may be going away; the lease then dies with it
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
