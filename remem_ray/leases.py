"""Leases kept in storage: who may write a shared folder (a teacher key), across every sweep,
driver and node that uses the same storage root.

A lease is a numbered series of small records, `<folder>/<generation>.json`, the newest one
in force. Taking the lease means creating the next generation's record with an exclusive
create (`Storage.create_exclusive`: a hard link locally, If-None-Match on S3), so of any
number of contenders exactly one wins. The holder renews its own record (a beat counter) and
marks it released when done.

A lease is stale when its record has not changed for `stale_after_s` as seen by the waiter's
own monotonic clock: no comparison of wall clocks between nodes. A holder that was declared
stale (a long pause, a network blip) finds a newer generation when it next renews or checks,
and must stop writing: `LeaseHandle.lost()` answers that question from anywhere (a Train
worker), from storage alone.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from remem_ray.errors import ResourceError
from remem_ray.storage import Storage

KEEP_GENERATIONS = 2  # older records are pruned by whoever takes the lease
HEARTBEAT_S = 5.0  # a holder's pace: it renews this often


@dataclass(frozen=True)
class LeaseRecord:
    generation: int
    holder: str
    token: str  # unique per taking: tells a holder's own record from a later one of the same holder
    beat: int = 0
    released: bool = False
    host: str = ""
    pid: int = 0


def _record_name(generation: int) -> str:
    return f"{generation:08d}.json"


def _generation_of(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "json" and stem.isdigit() else None


def current_record(folder: Storage) -> LeaseRecord | None:
    """The lease in force (the newest generation), or None if the lease was never taken."""
    for _ in range(3):  # a record pruned between listing and reading: list again
        generations = [g for g in map(_generation_of, folder.list_dir()) if g is not None]
        if not generations:
            return None
        try:
            return LeaseRecord(**json.loads(folder.read_text(_record_name(max(generations)))))
        except (ResourceError, json.JSONDecodeError, TypeError):
            continue
    raise ResourceError(f"lease {folder.uri()}: cannot read its newest record")


_PROCESS_TOKEN = uuid.uuid4().hex[:12]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.cache  # one process's answer never changes
def process_space() -> str:
    """Where this process's pid means something: the host name, the kernel's boot and the pid
    namespace. Two records with the same one name the same process table (a container sharing
    the host's name but not its pids, or a cloned VM, has another). Kept in a record's `host`."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    boot = _read("/proc/sys/kernel/random/boot_id")[:8]
    if not namespace or not boot:  # no /proc (macOS): only this process is sure to be in it
        return f"{socket.gethostname()} process {_PROCESS_TOKEN}"
    return f"{socket.gethostname()} boot {boot} pidns {namespace}"


def process_gone(record: LeaseRecord) -> bool:
    """Whether the record's holder was a process in this process table that has ended (a reused
    pid reads as alive: the waiter then waits the stale window, the safe side)."""
    if record.host != process_space() or record.pid <= 0:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # ended but not yet reaped by its parent (a zombie answers signal 0 too)
        with open(f"/proc/{record.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def lost_reason(folder: Storage, generation: int, token: str) -> str | None:
    """None while the lease taken as (generation, token) is in force; else who has it now."""
    current = current_record(folder)
    if current is not None and current.generation == generation and current.token == token:
        return None
    if current is None:
        return "its record is gone"
    return f"it passed to {current.holder} (generation {current.generation})"


class Outage:
    """A run of storage errors without a success between them: a loss once it lasts the stale
    window (a worker's lease checks here, a waiter's looks in remem_ray.sweep.registry.Waiter)."""

    def __init__(self) -> None:
        self._since: float | None = None

    def over(self) -> None:
        self._since = None

    def lasted(self, now: float) -> float:
        """Seconds since the run's first error, counting this one (now)."""
        self._since = now if self._since is None else self._since
        return now - self._since


class Lease:
    """One contender's view of one lease; not thread-safe (the heartbeat owns it while held)."""

    def __init__(
        self, folder: Storage, holder: str, stale_after_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.folder, self.holder, self.stale_after_s, self._clock = folder, holder, stale_after_s, clock
        self.record: LeaseRecord | None = None  # ours, while we hold the lease
        self._seen: tuple[int, int, str] | None = None
        self._seen_since = 0.0
        self._last_ok = 0.0  # when storage last took our beat: an outage counts from there
        self._lock = threading.Lock()  # a renew in flight and a release never interleave

    def try_acquire(self, gone: Callable[[LeaseRecord], bool] | None = None) -> bool:
        """Take the lease if it is free, released, this process's own, or stale; or held by a
        holder that `gone` knows has ended (its process on this host, say): no need to wait."""
        current = current_record(self.folder)
        if current is not None and not current.released and not self._own(current) and not (gone and gone(current)):
            signature = (current.generation, current.beat, current.token)
            now = self._clock()
            if signature != self._seen:
                self._seen, self._seen_since = signature, now
                return False
            if now - self._seen_since < self.stale_after_s:
                return False
        generation = 1 if current is None else current.generation + 1
        mine = LeaseRecord(generation, self.holder, uuid.uuid4().hex, host=process_space(), pid=os.getpid())
        sent = self._clock()
        self.folder.create_exclusive(_record_name(generation), json.dumps(asdict(mine)).encode())
        # Ours only if it is the newest record now. Refused, a retried PUT whose first try landed
        # answers 412 too (then the token is ours); created, a contender that stalled after its
        # look may have created a generation that newer takers had already pruned.
        winner = current_record(self.folder)
        if winner is None or winner.token != mine.token:
            return False
        self.record = mine
        self._last_ok = sent
        self._prune(generation)
        return True

    def _own(self, record: LeaseRecord) -> bool:
        """Taken by this holder in this very process (an outage hid whether our create landed).
        The same holder name in another process is another copy of it, say a trial rerun by a new
        driver while the old driver's copy still trains: it waits as anyone does, until that copy
        ends (`gone`) or goes stale; taking at once, the two copies would take it from each other
        in turn, each losing its work."""
        return record.holder == self.holder and record.host == process_space() and record.pid == os.getpid()

    def exclusive_create_refused(self) -> bool:
        """Whether storage refuses to create the record we hold a second time, as an exclusive
        create must. An S3 server that ignores If-None-Match accepts it (the same bytes: nothing
        changes), and then no lease on it excludes anyone. Ask right after taking the lease."""
        if self.record is None:
            raise RuntimeError(f"lease {self.folder.uri()}: not held by {self.holder}")
        again = json.dumps(asdict(self.record)).encode()
        return not self.folder.create_exclusive(_record_name(self.record.generation), again)

    def renew(self) -> bool:
        """Beat once; False if the lease has passed to someone else or was released (stop writing).

        A storage error is not a loss while less than `stale_after_s` has passed since the last
        beat storage took: others take the lease only after that long without a beat. Past it the
        holder cannot know it still holds, so it counts as lost. (Counted from the last beat, not
        from the first error: one call can spend a minute in retries before it fails.)
        """
        with self._lock:
            if self.record is None:
                return False
            try:
                if lost_reason(self.folder, self.record.generation, self.record.token) is not None:
                    self.record = None
                    return False
                sent = self._clock()  # a beat counts from its sending: retries may land it long before they return
                self.record = self._rewrite(self.record, beat=self.record.beat + 1)
                self._last_ok = sent
            except ResourceError:
                if self._clock() - self._last_ok >= self.stale_after_s:
                    self.record = None
                    return False
            return True

    def release(self) -> None:
        """Give the lease up now (waiters need not wait for it to go stale); a no-op if lost.
        A renew still in flight finishes first, and none follows."""
        with self._lock:
            if self.record is None:
                return
            try:
                if lost_reason(self.folder, self.record.generation, self.record.token) is None:
                    self._rewrite(self.record, released=True)
            except ResourceError:
                pass  # it goes stale instead
            self.record = None

    def _rewrite(self, record: LeaseRecord, **changes: Any) -> LeaseRecord:
        """Our own record again, changed (only the holder of a generation writes its record)."""
        changed = replace(record, **changes)
        self.folder.write_text(_record_name(changed.generation), json.dumps(asdict(changed)))
        return changed

    def holder_now(self) -> str | None:
        current = current_record(self.folder)
        return None if current is None or current.released else current.holder

    def handle(self) -> LeaseHandle:
        if self.record is None:
            raise RuntimeError(f"lease {self.folder.uri()}: not held by {self.holder}")
        return LeaseHandle(
            self.folder.uri(),
            self.folder.endpoint,
            self.folder.region,
            self.record.generation,
            self.record.token,
            self.stale_after_s,
        )

    def _prune(self, generation: int) -> None:
        """Old records go; a storage error leaves them for the next taker (never fails a holder)."""
        try:
            for name in self.folder.list_dir():
                old = _generation_of(name)
                if old is not None and old <= generation - KEEP_GENERATIONS:
                    self.folder.delete_file(name)
        except ResourceError:
            pass


@dataclass(frozen=True)
class LeaseHandle:
    """What a worker needs to check, from storage alone, that its holder still holds the lease."""

    folder: str
    endpoint: str | None
    region: str
    generation: int
    token: str
    stale_after_s: float = 60.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeaseHandle:
        return cls(**data)

    def lost(self) -> str | None:
        """None while the lease is still ours; else who has it now (read from storage). Raises
        ResourceError when storage does not answer (LeaseWatch decides what that means)."""
        return lost_reason(self._storage, self.generation, self.token)

    @functools.cached_property
    def _storage(self) -> Storage:  # one per handle: each check would make its S3 clients again
        return Storage(self.folder, self.endpoint, self.region)


class LeaseWatch:
    """A worker's checks of its holder's lease, with the holder's rule for storage errors: an
    outage shorter than the stale window is not a loss; one that lasts it is (the holder cannot
    know it still holds), so nothing more is written. A check that meets an error asks again
    every few seconds until storage answers or the window has passed. Never raises."""

    RETRY_S = 5.0

    def __init__(
        self,
        handle: LeaseHandle,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.handle, self._clock, self._sleep = handle, clock, sleep

    def lost(self) -> str | None:
        outage = Outage()
        while True:
            try:
                return self.handle.lost()
            except ResourceError as exc:
                lasted = outage.lasted(self._clock())
                if lasted >= self.handle.stale_after_s:
                    return f"storage unreachable for {lasted:.0f} s, the stale window ({exc})"
                self._sleep(min(self.RETRY_S, self.handle.stale_after_s - lasted))


class Renewable(Protocol):
    """What a heartbeat keeps alive: a Lease, or a run slot (sweep/run_slots.py)."""

    def renew(self) -> bool: ...

    def release(self) -> None: ...


class Heartbeat:
    """Renews a held lease from a background thread while the holder trains; `lost` is set
    (and renewing ends) once the lease has passed to another holder.

    `stopping`: an event set when the holder's process is about to be ended (Tune stopping the
    trial, ASHA's stop included), with no `finally` to run in the thread blocked on the Train run:
    the lease is released then, so waiters take the key at once, not after the stale window.
    `on_lost`: called from the heartbeat's thread once the lease is lost while the block runs."""

    def __init__(
        self,
        lease: Renewable,
        every_s: float,
        stopping: threading.Event | None = None,
        on_lost: Callable[[], object] | None = None,
    ) -> None:
        self._lease, self._every, self._stopping, self._on_lost = lease, every_s, stopping, on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._watch = threading.Thread(target=self._release_when_stopping, daemon=True)

    def _release_when_stopping(self) -> None:
        assert self._stopping is not None
        while not self._stopping.wait(0.5):  # wakes at once when set; ends soon after the heartbeat does
            if self._stop.is_set():
                return
        if not self._stop.is_set():
            self._lease.release()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            if not self._lease.renew():
                self.lost.set()
                if self._on_lost is not None and not self._stop.is_set():
                    self._on_lost()
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        if self._stopping is not None:
            self._watch.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
