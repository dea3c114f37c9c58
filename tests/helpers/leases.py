"""Lease states that tests set up."""

from __future__ import annotations

import subprocess
import sys

from remem_ray.storage import Storage


def leave_lease_held_by_an_ended_process(folder: Storage, holder: str) -> None:
    """A holder whose process ended holding the lease (Tune ended the trial before its heartbeat's
    release landed, on a loaded machine; or it was killed): no release, no more beats."""
    code = (
        "from remem_ray.leases import Lease; from remem_ray.storage import Storage; "
        f"assert Lease(Storage({folder.uri()!r}), {holder!r}, 60.0).try_acquire()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
