"""Test-only fault points: hold a training run at a named moment so that a test can kill it there.

Fault tests must not race the machine's speed. With

    REMEM_TEST_HOLD_AT="student:2,student:4"   (role:epoch, after that epoch is reported)
    REMEM_TEST_HOLD_DIR=<folder>

(`teacher-checked:2`: a teacher holding a lease, right after epoch 2's lease check and before
anything of that epoch is written; `holder:1`: a trial's driver that has just taken and claimed
lease generation 1 of a teacher key, its heartbeat running: the claimed file's pid is the driver's)

the first run (its rank 0) to reach a point claims it by creating `<folder>/<role>-<epoch>.claimed`
(JSON: its pid and output folder) and waits there until `<folder>/<role>-<epoch>.release` appears;
every point holds once per folder, later runs pass it. A point written `role:epoch@text` holds only
runs whose output folder contains `text` (one sweep's runs, on a cluster several tests share).
Unset, a loop pays one environment lookup per epoch. Not for production use: a held run waits forever.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HOLD_AT = "REMEM_TEST_HOLD_AT"
HOLD_DIR = "REMEM_TEST_HOLD_DIR"


def hold_if_asked(role: str, epoch: int, output: str) -> None:
    points = os.environ.get(HOLD_AT)
    if not points or not any(_matches(point, role, epoch, output) for point in points.split(",")):
        return
    folder = Path(os.environ[HOLD_DIR])
    try:
        fd = os.open(folder / f"{role}-{epoch}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another run holds (or held) this point
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "output": output}, f)
    release = folder / f"{role}-{epoch}.release"
    while not release.exists():
        time.sleep(0.2)


def _matches(point: str, role: str, epoch: int, output: str) -> bool:
    moment, _, needle = point.partition("@")
    return moment == f"{role}:{epoch}" and needle in output
