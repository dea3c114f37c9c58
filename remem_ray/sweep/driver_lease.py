"""One driver per sweep: the sweep folder's lease, held by whichever `run` or `resume` drives it.

Two drivers of one sweep (a `resume` while the first driver still runs, say as a submitted job;
two `run`s of one new name at once) would each restart the unfinished trials under the same ids,
and two copies of a trial take each other's teacher lease in turn, forever, while both drivers
write the experiment's state. So the driver takes `<sweep>/driver-lease/` before its first write
(leases.py: an exclusive create of the next generation) and renews it while the sweep runs.

A driver finding it held: a released lease, or one whose holder was a process of this process
table that has ended, is taken at once (the usual resume after Ctrl-C or a crash); a holder that
shows life (a beat) is alive, and the driver refuses with one line; one that stays silent for the
stale window is taken over. A holder that finds its lease taken over (it was paused past the
window) stops its trials as Ctrl-C would and ends without a summary: the other one drives the
sweep now. So does one cut off from storage for the stale window (others may reach it, and take over).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from remem_ray.errors import ResourceError
from remem_ray.leases import Heartbeat, Lease, LeaseRecord, current_record, process_gone
from remem_ray.sweep.layout import SweepLayout

DRIVER_LEASE = "driver-lease"
POLL_S = 2.0
RENEW_EVERY_S = 5.0


class SweepDriven(ResourceError):
    """Another live driver runs this sweep."""


class DriverLease:
    """The sweep's driver lease while this driver holds it, and why it was lost if it was."""

    def __init__(self, lease: Lease, resume: str) -> None:
        self.lease, self.resume = lease, resume
        self.lost: str | None = None
        self._interrupting = True
        self._lock = threading.Lock()

    def holds(self) -> bool:
        """Whether this driver still drives the sweep, as far as it knows (the copies it keeps for
        readers, the study's and an s3:// log's, are written only then)."""
        return self.lost is None

    def raise_if_lost(self) -> None:
        """After Tune stops (or an interrupt the loss sent), and before each of the driver's last
        writes: a driver that lost its lease ends here, writing none of its own files into a sweep
        another driver may run now. Tune's own last save as it stops is not held back: its
        experiment state carries its session's name (a resume reads the newer driver's), but the
        per-trial result files it rewrites stay older copies until the running driver syncs again."""
        if self.lost is not None:
            raise SweepDriven(f"sweep: {self.lost}")

    def settle(self) -> None:
        """Tune has ended: from now on a loss is only noted, for `raise_if_lost` before each write.
        Its interrupt would otherwise land anywhere in the summary's writing, leaving half of it."""
        with self._lock:
            self._interrupting = False

    def _stop(self, interrupt: Callable[[], None]) -> None:
        with self._lock:  # never after `settle` has returned
            if self._interrupting:
                interrupt()


def driving_holder(layout: SweepLayout) -> str | None:
    """Who holds the sweep's driver lease now, if anyone (storage not answering: unknown, None);
    not a holder that was a process of this host and has ended (killed, say: it never released)."""
    current = _held_record(layout)
    return None if current is None else current.holder


def _held_record(layout: SweepLayout) -> LeaseRecord | None:
    """driving_holder's record (None: none held, ended here, or storage not answering)."""
    try:
        current = current_record(layout.experiment.child(DRIVER_LEASE))
    except ResourceError:
        return None
    return None if current is None or current.released or process_gone(current) else current


def _signature(record: LeaseRecord) -> tuple[int, int, str]:
    """What changes when a holder shows life: a beat, a newer generation, another taker."""
    return (record.generation, record.beat, record.token)


def live_driver(
    layout: SweepLayout,
    watch_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    note: Callable[[str], None] = lambda line: None,
) -> str | None:
    """The holder of the sweep's driver lease if it shows life within `watch_s` (a beat: a driver
    renews every few seconds, but skips beats while storage does not answer it, up to the stale
    window: watch that long to be sure); None if none holds it, or its holder shows none (a driver
    of another host that was killed leaves its lease unreleased, and `driving_holder` names it)."""
    first = _held_record(layout)
    if first is None:
        return None
    note(
        f"sweep {layout.name}: its driver lease is held by {first.holder}; looking for a sign of life "
        f"(up to {watch_s:.0f} s)"
    )
    folder = layout.experiment.child(DRIVER_LEASE)
    deadline = clock() + watch_s
    try:
        while clock() < deadline:
            sleep(1.0)
            now = current_record(folder)
            if now is None or now.released:
                return None
            if _signature(now) != _signature(first):
                return now.holder
    except ResourceError:
        return None
    return None


def _holder() -> str:
    return f"driver {socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"


@contextlib.contextmanager
def driving_lease(
    layout: SweepLayout,
    stale_after_s: float,
    show: Callable[[str], None],
    renew_every_s: float = RENEW_EVERY_S,
    on_lost: Callable[[], None] | None = None,
    after_taking: Callable[[], None] | None = None,
    resume: str = "remem sweep resume",
) -> Iterator[DriverLease]:
    """Hold the sweep's driver lease while the block runs (see the module doc); released on every
    way out. `after_taking`: checks that need the lease held (a `run` looks again for a sweep
    that a driver it waited for may have created meanwhile)."""
    lease = Lease(layout.experiment.child(DRIVER_LEASE), _holder(), stale_after_s)
    _take(lease, stale_after_s, show, layout.name)
    try:
        if not lease.exclusive_create_refused():  # the sweep's first exclusive create: is it one?
            where = f" at {layout.root.endpoint}" if layout.root.endpoint else ""
            raise ResourceError(
                f"storage.root: the S3 server{where} ignores conditional writes (If-None-Match: *), on which "
                f"every lease of remem-ray relies (one trainer per teacher, one driver per sweep): use a "
                f"server that honours them (AWS S3, SeaweedFS and moto do)"
            )
        if after_taking is not None:
            after_taking()
        driver = DriverLease(lease, resume)

        def lost() -> None:
            driver.lost = "this driver lost its lease"  # at once: why takes a storage read, maybe a minute's retries
            driver.lost = _why_lost(driver)
            show(f"{driver.lost}: stopping")
            driver._stop(on_lost or _interrupt)

        with Heartbeat(lease, renew_every_s, on_lost=lost):
            try:
                yield driver
            except KeyboardInterrupt:  # the loss's own interrupt, outside Tune's run: say why
                driver.raise_if_lost()
                raise
    finally:
        lease.release()  # a no-op once lost


def _take(
    lease: Lease,
    stale_after_s: float,
    show: Callable[[str], None],
    name: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Take the lease, waiting while its holder may have ended; refuse as soon as it shows life
    (a beat, a newer generation) or once the wait is over."""
    deadline = clock() + stale_after_s + 3 * POLL_S
    first = None
    while not lease.try_acquire(gone=process_gone):
        current = current_record(lease.folder)
        if current is None or current.released:  # released or pruned meanwhile: take it next time
            if clock() >= deadline:
                raise SweepDriven(f"sweep: cannot take the driver lease at {lease.folder.uri()} (storage lags?)")
            sleep(POLL_S / 4)
            continue
        signature = _signature(current)
        alive = first is not None and signature != first
        if alive or clock() >= deadline:
            raise SweepDriven(
                f"sweep: {name!r} is being run by {current.holder} (its lease at {lease.folder.uri()} is held): "
                f"stop that driver or wait for it to end"
            )
        if first is None:
            first = signature
            show(
                f"sweep {name}: its driver lease is held by {current.holder}; waiting up to {stale_after_s:.0f} s "
                f"for a sign of life (a driver still running renews it every few seconds)"
            )
        sleep(POLL_S)


def _why_lost(driver: DriverLease) -> str:
    """A newer holder, or storage out of reach for the stale window (then nobody can say who drives
    the sweep: this driver stops as a teacher's holder would, and a resume continues it)."""
    try:
        current = current_record(driver.lease.folder)
    except ResourceError:
        return (
            f"this driver could not reach storage for {driver.lease.stale_after_s:.0f} s, so another driver "
            f"may take the sweep over; once storage answers, `{driver.resume}` continues it"
        )
    who = current.holder if current is not None else "another driver"
    return f"this driver's lease passed to {who}, which runs the sweep now"


def _interrupt() -> None:
    """Stop as Ctrl-C does: Tune saves its state (files of its own session) and ends the trials."""
    os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, by Tune's handler while it runs
