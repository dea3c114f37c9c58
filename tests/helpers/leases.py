"""Lease states that tests set up."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from remem_ray.storage import Storage


def _take_in_a_process(folder: Storage, holder: str, then: str) -> list[str]:
    code = (
        "from remem_ray.leases import Lease; from remem_ray.storage import Storage; "
        f"assert Lease(Storage({folder.uri()!r}, {folder.endpoint!r}), {holder!r}, 60.0).try_acquire(); {then}"
    )
    return [sys.executable, "-c", code]


def leave_lease_held_by_an_ended_process(folder: Storage, holder: str) -> None:
    """A holder whose process ended holding the lease (Tune ended the trial before its heartbeat's
    release landed, on a loaded machine; or it was killed): no release, no more beats."""
    subprocess.run(_take_in_a_process(folder, holder, "pass"), check=True, timeout=120)


@contextlib.contextmanager
def lease_held_by_a_live_process(folder: Storage, holder: str) -> Iterator[None]:
    """A holder alive in another process of this host while the block runs (no beats: the block's
    clock decides when it goes stale); it has ended, the lease unreleased, when the block ends."""
    code = _take_in_a_process(folder, holder, "print('held', flush=True); import sys; sys.stdin.read()")
    proc = subprocess.Popen(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.communicate(timeout=120)  # stdin closed: it ends
