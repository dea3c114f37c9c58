"""One driver per sweep: the sweep folder's lease, held by whichever `run` or `resume` drives it.

Two drivers of one sweep (a `resume` while the first driver still runs, say as a submitted job;
two `run`s of one new name at once) would each restart the unfinished trials under the same ids,
and two copies of a trial take each other's teacher lease in turn, forever, while both drivers
write the experiment's state. So the driver takes `<sweep>/driver-lease/` before its first write
(leases.py: an exclusive create of the next generation) and renews it while the sweep runs.

A driver finding it held waits: a released lease or one whose holder was a process on this host
that has ended is taken at once (the usual resume after Ctrl-C or a crash); a holder elsewhere
that stops renewing is taken over after the stale window; one that keeps renewing is alive, and
the driver refuses with one line. A holder that finds its lease taken over (it was paused past the
window, a laptop asleep under Ray Client) stops its sweep as Ctrl-C would: the other one drives it now.
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
from remem_ray.leases import Lease, current_record, process_gone
from remem_ray.sweep.layout import SweepLayout

DRIVER_LEASE = "driver-lease"
POLL_S = 2.0


class SweepDriven(ResourceError):
    """Another live driver runs this sweep."""


def _holder() -> str:
    return f"driver {socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"


@contextlib.contextmanager
def driving_lease(
    layout: SweepLayout,
    stale_after_s: float,
    show: Callable[[str], None],
    renew_every_s: float = 5.0,
    on_lost: Callable[[], None] | None = None,
) -> Iterator[Lease]:
    """Hold the sweep's driver lease while the block runs (see the module doc)."""
    from remem_ray.sweep.registry import Heartbeat

    lease = Lease(layout.experiment.child(DRIVER_LEASE), _holder(), stale_after_s)
    _take(lease, stale_after_s, show, layout.name)
    if not lease.exclusive_create_refused():  # the sweep's first exclusive create: is it one?
        lease.release()
        where = f" at {layout.root.endpoint}" if layout.root.endpoint else ""
        raise ResourceError(
            f"storage.root: the S3 server{where} ignores conditional writes (If-None-Match: *), on which "
            f"every lease of remem-ray relies (one trainer per teacher, one driver per sweep): use a "
            f"server that honours them (AWS S3, SeaweedFS and moto do)"
        )
    heartbeat = Heartbeat(lease, renew_every_s)
    stop = threading.Event()
    watch = threading.Thread(target=_stop_when_lost, args=(heartbeat, stop, show, on_lost or _interrupt), daemon=True)
    with heartbeat:
        watch.start()
        try:
            yield lease
        finally:
            stop.set()
    lease.release()


def _take(
    lease: Lease,
    stale_after_s: float,
    show: Callable[[str], None],
    name: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    deadline = clock() + stale_after_s + 3 * POLL_S
    said = False
    while not lease.try_acquire(gone=process_gone):
        current = current_record(lease.folder)
        who = current.holder if current else "another driver"
        if clock() >= deadline:
            raise SweepDriven(
                f"sweep: {name!r} is being run by {who} (its lease at {lease.folder.uri()} is renewed): "
                f"stop that driver or wait for it to end"
            )
        if not said:
            show(
                f"sweep {name}: its driver lease is held by {who}; waiting up to {stale_after_s:.0f} s "
                f"for it to go stale (a driver still running keeps it)"
            )
            said = True
        sleep(POLL_S)


def _stop_when_lost(heartbeat, stop: threading.Event, show: Callable[[str], None], on_lost: Callable[[], None]) -> None:
    while not stop.is_set():
        if heartbeat.lost.wait(1.0):
            if not stop.is_set():
                show(
                    "this driver's lease on the sweep passed to another driver (this one was silent too long): stopping"
                )
                on_lost()
            return


def _interrupt() -> None:
    """Stop as Ctrl-C does: Tune saves its state (files of its own session) and ends the trials."""
    os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, by Tune's handler while it runs
