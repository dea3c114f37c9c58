"""Teacher registry: a teacher's checkpoints under <root>/teachers/<teacher_key>/, shared by every
sweep on the root (remem_ray.teacher_layout names the tree).

Exactly one trial, of any sweep, trains a key at a time: the holder of the key's lease in
storage; the others wait for the set in use to appear. Each holder writes only into its own
generation's folder. Readers follow the pointer, a numbered series of records in which every
new version is one exclusive create:

- taking the lease, a holder first *claims* the pointer (a version naming its generation and
  still the set in use before it): from then on no older holder can add a version, since an
  older generation never writes after a newer one;
- a holder publishes its finished folder with the next version, if no newer generation has
  claimed the pointer since.

So a holder paused past the stale window (and then woken) can write only into its own folder,
which is never published; the next holder reads it only to resume from its state, written whole
(atomic renames, checkpoints complete only once their manifest is); a retraining (after a
corrupt checkpoint) writes beside the set in use, which trials may be reading, and one create
switches readers over once it is finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from remem_ray.checkpoint_files import checkpoint_name, is_complete, verify_checkpoint
from remem_ray.config import LEASE_STALE_AFTER_S
from remem_ray.console import say
from remem_ray.errors import ResourceError
from remem_ray.leases import Lease, Outage
from remem_ray.storage import Storage
from remem_ray.teacher_layout import DIVERGED_FILE, RESUME_STATE, TeacherFolder, generation_dir, version_file

CLAIM, PUBLISH = "claim", "publish"
# a lease holder's pace, for teachers and students alike: renew every HEARTBEAT_S; a lease unrenewed
# STALE_AFTER_S is taken over (sweep.lease_stale_after_s sets it per sweep); waiters look every POLL_S
STALE_AFTER_S = LEASE_STALE_AFTER_S
POLL_S = 2.0
APPEND_TRIES = 12


def record_divergence(folder: Storage, message: str, again: str) -> str:
    """A training of a registry key (a teacher's, a student's) diverged. Its settings and seed give
    the same NaN again (training is seeded), so nobody trains the key again, each try spending its
    retries re-diverging, until someone removes the record. Returns the message naming the record."""
    folder.write_text(DIVERGED_FILE, json.dumps({"message": message, "time": time.time()}))
    return _divergence_message(folder, message, again)


def recorded_divergence(folder: Storage, again: str) -> str | None:
    """The key's recorded divergence, saying what lifts it; None if it never diverged."""
    if not folder.is_file(DIVERGED_FILE):
        return None
    try:
        message = json.loads(folder.read_text(DIVERGED_FILE))["message"]
    except (ValueError, KeyError, TypeError):
        message = "its training diverged"
    return _divergence_message(folder, message, again)


def _divergence_message(folder: Storage, message: str, again: str) -> str:
    return f"{message} (recorded in {folder.uri(DIVERGED_FILE)}: remove it to {again} again)"


@dataclass(frozen=True)
class TeacherSet:
    """A set of checkpoints of one teacher key, in one folder."""

    folder: Storage

    def uri(self) -> str:
        return self.folder.uri()

    def checkpoint_uri(self, epoch: int) -> str:
        return self.folder.uri(checkpoint_name(epoch))

    def missing(self, epochs: list[int]) -> list[int]:
        return [e for e in epochs if not is_complete(self.folder, checkpoint_name(e))]

    def verify(self, epoch: int) -> str | None:
        """None if that checkpoint is whole, else the problem (checked against its manifest's sha256)."""
        return verify_checkpoint(self.folder, checkpoint_name(epoch))

    def problem(self, epochs: list[int], epoch: int) -> str | None:
        """Why a trial using checkpoint `epoch` cannot use this set, or None: every candidate
        stored, the one used whole."""
        missing = self.missing(epochs)
        if missing:
            names = ", ".join(checkpoint_name(e) for e in missing)
            return f"checkpoint: {self.folder.uri()} lacks a complete {names}"
        return self.verify(epoch)


class TeacherRegistry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def folder(self, key: str) -> TeacherFolder:
        return TeacherFolder(self.storage.child(key))

    def lease(self, key: str, holder: str, stale_after_s: float) -> Lease:
        return Lease(self.folder(key).lease, holder, stale_after_s)

    def output(self, key: str, generation: int) -> Storage:
        """Where the holder of that lease generation writes."""
        return self.folder(key).generation(generation)

    # ------------------------------------------------------------- the pointer
    def _newest(self, key: str) -> tuple[int, dict] | None:
        folder = self.folder(key)
        versions = folder.versions()
        if not versions:
            return None
        name = version_file(versions[-1])
        try:
            record = json.loads(folder.sets.read_text(name))
            if not isinstance(record.get("generation"), int):
                raise ValueError("no generation in it")
        except (ValueError, AttributeError) as exc:  # versions are exclusive creates: damaged from outside
            raise ResourceError(
                f"storage: teacher {key}'s pointer version {folder.sets.uri(name)} is unreadable ({exc}): "
                f"remove it (the version before it is in use again)"
            ) from None
        return versions[-1], record

    def set_in_use(self, key: str, older_keys: Sequence[str] = ()) -> TeacherSet | None:
        """The set readers use: what the pointer names; for keys of older versions, their one set.
        With none under `key`, the first found under `older_keys` (what earlier versions called
        the same training: RunSpec.legacy_teacher_keys)."""
        found = self._set_under(key)
        for older in older_keys:
            if found is not None:
                break
            found = self._set_under(older)
        return found

    def _set_under(self, key: str) -> TeacherSet | None:
        folder = self.folder(key)
        named = self._named(key, self._newest(key))
        return None if named is None else TeacherSet(folder.storage.child(named))

    def _named(self, key: str, newest: tuple[int, dict] | None) -> str | None:
        """The folder (relative to the key's) of the set in use, given the pointer's newest version."""
        if newest is not None:
            return newest[1].get("folder")  # "" is the key's root: a set an older version trained
        folder = self.folder(key)
        legacy = folder.legacy_set()
        return legacy if _has_any_checkpoint(folder.storage.child(legacy)) else None

    def _append(self, key: str, generation: int, kind: str, folder_for, by_for) -> bool:
        """Add the pointer's next version for `generation`, naming `folder_for(newest version)` and
        who published that folder, `by_for(newest version)`; False once a newer generation has a
        version. Each try reads the newest version again: a version someone else added first (an
        older holder's publication) is built on, not lost."""
        sets = self.folder(key).sets
        for attempt in range(APPEND_TRIES):
            newest = self._newest(key)
            if newest is not None and newest[1]["generation"] > generation:
                return False
            version = 1 if newest is None else newest[0] + 1
            record = {
                "version": version,
                "generation": generation,
                "kind": kind,
                "folder": folder_for(newest),
                "by": by_for(newest),
            }
            if sets.create_exclusive(version_file(version), json.dumps(record).encode()):
                return True
            time.sleep(min(2.0, 0.05 * 2**attempt))  # a listing that lags the create (some S3 servers)
        raise ResourceError(f"teacher {key}: {sets.uri()} did not take a new version in {APPEND_TRIES} tries")

    def claim(self, key: str, generation: int) -> bool:
        """Taken by the holder of `generation` right after it takes the lease: no older holder can
        change the set in use from here on; readers keep the set they had. False if a newer
        generation got there first (this holder's lease has passed on already)."""
        return self._append(key, generation, CLAIM, lambda newest: self._named(key, newest), _published_by)

    def publish(self, key: str, generation: int, by: str = "") -> bool:
        """Make that generation's folder the set in use, published `by` its holder (sweep/trial);
        False if a newer generation claimed the pointer meanwhile (its holder goes on; this one's
        lease had passed)."""
        return self._append(key, generation, PUBLISH, lambda newest: generation_dir(generation), lambda newest: by)

    def published_by(self, key: str) -> str | None:
        """The holder (sweep/trial) that published the key's set in use, where its pointer says."""
        return _published_by(self._newest(key)) or None

    def record_divergence(self, key: str, message: str) -> str:
        """The key's training diverged: no trial trains it again (see `record_divergence`)."""
        return record_divergence(self.folder(key).storage, message, "train this teacher")

    def divergence(self, key: str) -> str | None:
        """Why the key's training was given up, with what lifts it; None if it never diverged."""
        return recorded_divergence(self.folder(key).storage, "train this teacher")

    def resume_source(self, key: str, generation: int) -> Storage | None:
        """The newest earlier generation's folder holding a resume state, to continue from."""
        folder = self.folder(key)
        for older in reversed(folder.generations()):
            if older < generation and folder.generation(older).is_file(RESUME_STATE):
                return folder.generation(older)
        return None


@dataclass(frozen=True)
class TeacherInUse:
    """Where a key's checkpoint of one epoch is now: the set in use's, if whole (sha256), else None.
    A student run asks it when the checkpoint it was given fails its check (a set broken after
    its trial verified it and retrained since): plain data, it travels pickled to the worker."""

    registry: TeacherRegistry
    key: str
    older_keys: tuple[str, ...]
    epoch: int

    def __call__(self) -> str | None:
        in_use = self.registry.set_in_use(self.key, self.older_keys)
        if in_use is None or in_use.verify(self.epoch) is not None:
            return None
        return in_use.checkpoint_uri(self.epoch)


def _published_by(newest: tuple[int, dict] | None) -> str:
    """Who published the folder a pointer version names (a claim carries it on)."""
    return str(newest[1].get("by") or "") if newest is not None else ""


def _has_any_checkpoint(folder: Storage) -> bool:
    return any(name.startswith("epoch_") for name in folder.list_dir())


class Waiter:
    """A trial's pace while another holds the lease on what it needs (a teacher, a student): a
    line every `note_every_s`, a TimeoutError naming `what` past `timeout_s`, `poll_s` between looks.
    A look that storage does not answer is waited through for as long as holders ride out an
    outage (their lease's stale window), so an outage that spares the holder spares its waiters."""

    def __init__(
        self,
        what: str,
        timeout_s: float,
        poll_s: float,
        note_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.timeout_s, self.poll_s, self.note_every_s = what, timeout_s, poll_s, note_every_s
        self.clock = clock
        self._deadline = clock() + timeout_s
        self._noted = -note_every_s
        self._outage = Outage()

    def wait(self, note: Callable[[], str]) -> None:
        now = self.clock()
        if now - self._noted >= self.note_every_s:
            try:
                line = note()
            except ResourceError as exc:  # the note names the holder, read from storage
                line = f"waiting for {self.what}; storage did not answer: {exc}"
            say(line)
            self._noted = now
        if now > self._deadline:
            raise TimeoutError(f"{self.what}: not ready after {self.timeout_s:.0f} s")
        time.sleep(self.poll_s)

    def ride_out(self, exc: ResourceError, outage_limit_s: float) -> None:
        """A look at storage failed: wait and look again, until storage has failed every look for
        `outage_limit_s` (the lease's stale window); then `exc` is raised."""
        if self._outage.lasted(self.clock()) > outage_limit_s:
            raise exc
        self.wait(lambda: f"waiting for {self.what}; storage did not answer ({exc}), looking again")

    def answered(self) -> None:
        """A look at storage was answered: an outage, if there was one, is over."""
        self._outage.over()
