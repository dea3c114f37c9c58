"""Student registry: finished distillations under <root>/students/<student_key>/, shared by every
sweep on the root, so no sweep distils a student another has finished (issue 25).

    <key>/lease/<generation>.json     who distils the key now (remem_ray.leases)
    <key>/records/<version>.json      a finished student: the curve its run reported, one entry
                                      per epoch, its best epoch, and the folder of that checkpoint;
                                      each version one exclusive create, the newest in force
    <key>/run-<id>/best_epoch_<e>/    its best checkpoint: each publishing run writes a folder of
                                      its own, whole before a record names it
    <key>/diverged.json               written once its distillation diverged (NaN or infinite
                                      loss): the key is not distilled again until it is removed

A trial whose key has a record does not distil: it replays the stored curve to Tune, epoch by
epoch, so the scheduler and the searcher see what the original run reported, and points its
student folder at the stored checkpoint. A trial whose key another trial is distilling waits
for it holding no Train run, as trials wait for teachers. The lease only spares work: the record
is the fence. Every publication is the exclusive create of the version after the one its writer
found broken (or of the first), so of two holders (one paused past the stale window, one that
took over) exactly one publishes, and a reader never sees a folder before its checkpoint is whole.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from remem_ray.checkpoint_files import (
    META_FILE,
    best_checkpoint_name,
    best_name,
    copy_checkpoint,
    is_best_name,
    point_stored_best,
    verify_checkpoint,
)
from remem_ray.console import say
from remem_ray.contract import (
    EPOCH,
    STUDENT_KEY,
    STUDENT_REPLAYED,
    TEACHER_KEY,
    TEACHER_MI,
    TEACHER_TRAINED,
    teacher_mi_of,
)
from remem_ray.errors import ResourceError, TrainingDivergedError
from remem_ray.leases import HEARTBEAT_S, Heartbeat, Lease, LeaseHandle, process_gone
from remem_ray.storage import Storage
from remem_ray.sweep.registry import POLL_S, STALE_AFTER_S, Waiter, record_divergence, recorded_divergence
from remem_ray.teacher_layout import LEASE_DIR, version_file

RECORDS_DIR = "records"
# What a report said about the process that produced it, not about the student: a replay leaves
# them out (a replayed trial has no Train run, and trained no teacher)
ORIGINAL_RUN_ONLY = (
    "trial_started_at",
    "fit_called_at",
    "trial_driver_rss_mb",
    "student_in_teacher_run",
    "replayed",
    TEACHER_TRAINED,
)


@dataclass(frozen=True)
class StudentRecord:
    """A finished student as stored: `history` is what its run reported, epoch by epoch."""

    key: str
    version: int
    folder: Storage  # the run's folder holding best_epoch_<best_epoch>/
    best_epoch: int
    history: tuple[dict[str, Any], ...]
    made_by: str  # sweep/trial that distilled it
    unreadable: str | None = None  # why the record itself could not be read, if it could not

    def checkpoint_uri(self) -> str:
        return self.folder.uri(best_name(self.best_epoch))

    def problem(self) -> str | None:
        """None if the record reads and its best checkpoint is whole (sha256 against its
        manifest), else what is wrong."""
        return self.unreadable or verify_checkpoint(self.folder, best_name(self.best_epoch))


class StudentRegistry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage  # <root>/students

    def folder(self, key: str) -> Storage:
        return self.storage.child(key)

    def lease(self, key: str, holder: str, stale_after_s: float) -> Lease:
        return Lease(self.folder(key).child(LEASE_DIR), holder, stale_after_s)

    def newest(self, key: str) -> StudentRecord | None:
        records = self.folder(key).child(RECORDS_DIR)
        versions = sorted(int(n[: -len(".json")]) for n in records.list_dir() if n[: -len(".json")].isdigit())
        if not versions:
            return None
        rel = version_file(versions[-1])
        try:
            data = json.loads(records.read_text(rel))
            return StudentRecord(
                key,
                versions[-1],
                self.folder(key).child(data["folder"]),
                int(data["best_epoch"]),
                tuple(data["history"]),
                data.get("made_by", ""),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            why = f"record {records.uri(rel)} is unreadable"
            return StudentRecord(key, versions[-1], self.folder(key), 0, (), "", unreadable=why)

    def record_divergence(self, key: str, message: str) -> str:
        """The key's distillation diverged: no trial distils it again (registry.record_divergence)."""
        return record_divergence(self.folder(key), message, "distil this student")

    def divergence(self, key: str) -> str | None:
        """Why the key's distillation was given up, with what lifts it; None if it never diverged."""
        return recorded_divergence(self.folder(key), "distil this student")

    def publish(self, key: str, after_version: int, output: Storage, history: list[dict], made_by: str) -> bool:
        """Store the student finished in `output` (its best.json and that checkpoint) as version
        `after_version + 1`: its checkpoint is copied (sha256-checked) into a folder of this
        publication's own first, then the record is created. False if that version exists
        already (another run published first; its student is the same distillation)."""
        records = self.folder(key).child(RECORDS_DIR)
        version = after_version + 1
        if records.is_file(version_file(version)):
            return False
        best = best_checkpoint_name(output)
        if best is None or not is_best_name(best):
            raise ResourceError(f"student {key}: {output.uri()} has no best_epoch_<e> checkpoint to publish")
        epoch = int(best.rsplit("_", 1)[-1])
        folder = f"run-{uuid.uuid4().hex[:12]}"
        copy_checkpoint(output, self.folder(key).child(folder), best_name(epoch))
        record = {
            "student_key": key,
            "version": version,
            "folder": folder,
            "best_epoch": epoch,
            "history": history,
            "made_by": made_by,
            "time": time.time(),
        }
        if records.create_exclusive(version_file(version), json.dumps(record).encode()):
            return True
        try:  # a retried PUT whose first try landed is answered "exists" too: ours if it names our folder
            winner = json.loads(records.read_text(version_file(version))).get("folder")
        except (ResourceError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
        if winner == folder:
            return True
        self.folder(key).delete_dir(folder)  # no record names it: nobody reads it
        return False


class StudentFinished:
    """Run on a student run's rank 0 once its last epoch is done, before its report (a scheduler
    may end the run inside that report): the student joins the registry. A failure to publish
    costs only a later sweep's reuse, never this trial's result, so it is logged, not raised."""

    def __init__(self, registry: StudentRegistry, key: str, after_version: int, made_by: str):
        self.registry, self.key, self.after_version, self.made_by = registry, key, after_version, made_by

    def __call__(self, output: Storage, history: list[dict[str, Any]], log: Callable[[str], None]) -> bool:
        try:
            published = self.registry.publish(self.key, self.after_version, output, history, self.made_by)
        except Exception as exc:  # noqa: BLE001 (storage, a value JSON cannot hold: never fail a finished run)
            log(f"student {self.key[:8]} not stored for reuse: {type(exc).__name__}: {exc}")
            return False
        if not published:
            log(f"student {self.key[:8]}: another run stored it first; this run's result stays its trial's")
        return published

    def diverged(self, message: str) -> str:
        """Its distillation diverged (rank 0): kept for the key, so none distils it again."""
        return self.registry.record_divergence(self.key, message)

    def divergence(self) -> str | None:
        return self.registry.divergence(self.key)


def replay(record: StudentRecord, student_folder: Storage, report: Callable[[dict], None], extra: Mapping) -> None:
    """Report the stored curve, one report per epoch, as the original run reported it (less what
    described its process, plus `extra`; its teacher's MI read as today's runs read it). The
    trial's student folder points at the stored best from its epoch on: a replay stopped before
    it has no checkpoint, as the stored best came later."""
    teacher_mi = _teacher_mi_now(record)
    for reported in record.history:
        metrics = {k: v for k, v in reported.items() if k not in ORIGINAL_RUN_ONLY}
        metrics.update(extra)
        if teacher_mi is not None and TEACHER_MI in metrics:
            metrics[TEACHER_MI] = teacher_mi
        metrics[STUDENT_REPLAYED] = 1
        if metrics[EPOCH] == record.best_epoch:
            point_stored_best(student_folder, record.best_epoch, record.folder.uri())
        report(metrics)


def _teacher_mi_now(record: StudentRecord) -> float | None:
    """The teacher's headline MI from the family its meta records (the student checkpoint's meta
    holds its teacher's): a student stored before the headline changed (2026-12-07) reported the
    old one, and its replays mixed the two in one sweep's results. None where it does not read."""
    try:
        meta = json.loads(record.folder.read_text(f"{best_name(record.best_epoch)}/{META_FILE}"))
        return teacher_mi_of(meta["teacher"])
    except (ResourceError, ValueError, KeyError, TypeError, AttributeError):
        return None


def usable_record(
    registry: StudentRegistry, key: str, trial_id: str, broken: set[int] | None = None
) -> tuple[StudentRecord | None, int]:
    """(the key's record if its checkpoint is whole, else None; the newest version seen).
    `broken`: the versions found broken so far, not read again (a version is never rewritten, and
    a waiter looks every few seconds while the key is distilled again: each look would read and
    hash the whole checkpoint, and say so)."""
    record = registry.newest(key)
    if record is None:
        return None, 0
    if broken is not None and record.version in broken:
        return None, record.version
    problem = record.problem()
    if problem is None:
        return record, record.version
    if broken is not None:
        broken.add(record.version)
    say(f"trial {trial_id}: stored student {key[:8]} is not usable ({problem}); distilling it again")
    return None, record.version


def distil_once(
    registry: StudentRegistry,
    key: str,
    holder: str,
    distil: Callable[[StudentFinished, LeaseHandle], None],
    play: Callable[[StudentRecord], None],
    wait_timeout_s: float,
    stale_after_s: float = STALE_AFTER_S,
    stopping: threading.Event | None = None,
) -> str:
    """Replay the key's stored student, or distil it under the key's lease and store it:
    "replayed" or "distilled". `distil(finished, lease)` runs the Train run whose last epoch calls
    `finished`, its writes fenced by `lease` (the loop stops once it is lost); `play(record)`
    replays. Waits, with no Train run, while another holds the lease.
    `stopping`: set when this trial is being stopped (see Heartbeat)."""
    trial_id = holder.rsplit("/", 1)[-1]
    lease = registry.lease(key, holder, stale_after_s)
    waiter = Waiter(f"student {key}", wait_timeout_s, POLL_S)
    held: Waiter | None = None  # rides out the look under the lease: its own outage clock and deadline
    broken: set[int] = set()
    while True:
        try:
            record, seen = usable_record(registry, key, trial_id, broken)
            diverged = registry.divergence(key) if record is None else None
            if diverged is not None:  # seeded: a Train run would only diverge again
                raise TrainingDivergedError(diverged)
            taken = record is None and lease.try_acquire(gone=process_gone)  # a holder whose process ended: at once
        except ResourceError as exc:  # an outage: the holder rides it out, and so do its waiters
            waiter.ride_out(exc, stale_after_s)
            continue
        waiter.answered()
        if record is not None:
            play(record)
            return "replayed"
        if taken:
            try:
                with Heartbeat(lease, HEARTBEAT_S, stopping):
                    try:
                        record, seen = usable_record(registry, key, trial_id, broken)  # stored while we took it
                    except ResourceError as exc:  # ridden out as the looks before; the lease is given back
                        held = held or Waiter(f"student {key}", wait_timeout_s, POLL_S)
                        held.ride_out(exc, stale_after_s)
                        continue
                    held = None
                    if record is not None:
                        play(record)
                        return "replayed"
                    distil(StudentFinished(registry, key, seen, holder), lease.handle())
                return "distilled"
            finally:
                lease.release()
        waiter.wait(lambda: f"trial {trial_id}: waiting for student {key[:8]} (distilled by {lease.holder_now()})")


@contextlib.contextmanager
def key_held(
    registry: StudentRegistry,
    key: str,
    holder: str,
    wait_timeout_s: float,
    stale_after_s: float = STALE_AFTER_S,
    stopping: threading.Event | None = None,
) -> Iterator[LeaseHandle | None]:
    """The key's lease held while the block runs (its handle yielded, to fence the run's writes),
    for a restarted trial that goes on with its own
    student run (no replay, no record to look for first): it waits while another copy of itself
    holds the key alive. A resume restarts the unfinished trials, and the old driver's copies still
    run where that driver was paused past the stale window (a laptop asleep while it drove a
    cluster): two copies trained one student folder and one Train run. Held by another trial (of
    this sweep or another, distilling the same student into its own folder): the block runs at
    once, without the lease, as a restarted trial always did."""
    trial_id = holder.rsplit("/", 1)[-1]
    lease = registry.lease(key, holder, stale_after_s)
    waiter = Waiter(f"student {key}", wait_timeout_s, POLL_S)
    while True:
        try:
            taken = lease.try_acquire(gone=process_gone)  # a copy whose process ended: at once
            other = None if taken else lease.holder_now()
        except ResourceError as exc:
            waiter.ride_out(exc, stale_after_s)
            continue
        waiter.answered()
        if taken:
            break
        if other is not None and other != holder:  # another trial's: go on beside it
            yield None
            return
        waiter.wait(lambda: f"trial {trial_id}: waiting for another copy of itself, distilling student {key[:8]}")
    try:
        with Heartbeat(lease, HEARTBEAT_S, stopping):
            yield lease.handle()
    finally:
        lease.release()


def replay_extra(teacher_key: str, student_key: str) -> dict[str, Any]:
    return {TEACHER_KEY: teacher_key, TEACHER_TRAINED: 0, STUDENT_KEY: student_key}
