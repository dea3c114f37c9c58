"""The stored teacher-target table of one teacher checkpoint and data (remem_ray.train.targets):
where its files lie, how it is written and read, why it was refused, and how one run at a time
computes it under a lease while the others wait.

    <checkpoint parent>/targets/<checkpoint name>-<key>.pt        the table (float16)
    <checkpoint parent>/targets/<checkpoint name>-<key>.lease/    who computes it now: one run at a time
    <checkpoint parent>/targets/<checkpoint name>-<key>.refused   why its table was refused (non-finite)
    <checkpoint parent>/targets/<checkpoint name>-<key>.unkept    its computer could not keep it
    <checkpoint parent>/targets/<checkpoint name>-<key>.part-<run>-<rank>.pt   a DDP rank's share, until joined
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from remem_ray.config import LEASE_STALE_AFTER_S, TEACHER_WAIT_TIMEOUT_S
from remem_ray.errors import ResourceError
from remem_ray.leases import HEARTBEAT_S, Heartbeat, Lease, Outage, process_gone
from remem_ray.storage import Storage
from remem_ray.storage.fs import NotingFile
from remem_ray.teacher_layout import TARGETS_DIR
from remem_ray.train.common import is_distributed

CACHE_FORMAT = 1
WAIT_POLL_S = 2.0  # a run waiting for another's targets looks this often
WAIT_NOTE_EVERY_S = 30.0  # and says so this often


def cache_location(checkpoint_name: str, key: str) -> str:
    """Relative to the checkpoint's parent folder (the registry entry of a sweep's teacher)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.pt"


def lease_location(checkpoint_name: str, key: str) -> str:
    """The lease of the one run computing these targets (built_once)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.lease"


def unkept_location(checkpoint_name: str, key: str) -> str:
    """A note that the run that computed these targets could not keep them (built_once)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.unkept"


def part_location(checkpoint_name: str, key: str, run: str, rank: int) -> str:
    """A DDP rank's share of the table, until rank 0 joins the shares and removes them
    (`built_by_every_rank`). `run` is drawn by rank 0: runs of one key may compute beside each
    other (past the wait limit, beside a holder that could not keep its table, a paused holder
    taken over), and none may read or remove another's parts."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.part-{run}-{rank}.pt"


def refusal_location(checkpoint_name: str, key: str) -> str:
    """Beside the cache: why its targets were refused (non-finite), so a retry of the run, or
    another trial of the same checkpoint and data, fails at once instead of computing them again
    (ImageNet x 8 views is many minutes of a GPU). The key holds the weights' sha256; the note,
    the device and torch build it held for (_computed_on)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.refused"


def write_table(parent: Storage, rel: str, table: torch.Tensor, key: str) -> None:
    """Streamed: a table is up to 20 GB (ImageNet x 8 views), and its bytes in memory beside it
    (and a copy of them) tripled a rank's peak."""
    parent.write_with(rel, lambda f: torch.save({"key": key, "format": CACHE_FORMAT, "logits": table}, f))


def read_table(parent: Storage, rel: str, key: str) -> torch.Tensor | None:
    """The table if the file is whole and for this key; None if it must be rebuilt. Read in place
    (ranged reads), never all its bytes in memory beside the table. A storage error while reading
    raises (ResourceError): it says nothing of the file, and a rebuild costs a GPU-hour."""

    def load(f: NotingFile) -> torch.Tensor | None:
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
        except MemoryError:
            raise  # says nothing of the file
        except Exception:
            if f.failed is not None:  # storage's: raised as ResourceError by read_with
                raise f.failed from None
            return None  # truncated or corrupt: rebuild rather than trust it
        if not isinstance(blob, dict) or blob.get("key") != key or blob.get("format") != CACHE_FORMAT:
            return None
        return blob["logits"]

    return parent.read_with(rel, load)


def stored_table(parent: Storage, rel: str, key: str) -> torch.Tensor | None:
    return read_table(parent, rel, key) if parent.is_file(rel) else None


def rows_problem(table: torch.Tensor | None, size: int, location: str) -> str | None:
    if table is None:
        return f"student.teacher_targets: cache {location} could not be read"
    if table.shape[0] != size:
        return f"student.teacher_targets: cache holds {table.shape[0]} images, the training set {size}"
    return None


@dataclass(frozen=True)
class Waits:
    """How long a run waits on another's targets: its lease's stale window, then its limit."""

    stale_after_s: float = LEASE_STALE_AFTER_S
    wait_limit_s: float = TEACHER_WAIT_TIMEOUT_S


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.0f} s"


def built_once(
    parent: Storage,
    name: str,
    key: str,
    build: Callable[[], tuple[torch.Tensor | None, str | None]],
    device: torch.device,
    log,
    waits: Waits | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[torch.Tensor | None, str | None, bool]:
    """(table, why refused, built here): `build` run by one run at a time among all that want these
    targets (trials differing only in student settings start their runs together once their
    teacher is stored; sweeps share a registry), under a lease beside the cache; the others wait
    for its table or refusal, or take over from a holder that ended or went silent for the stale
    window. A holder that lost its lease (paused past the window) writes the same table as its
    successor: no fence needed.

    Computed beside the others, without the lease, where none can be taken (a read-only grant),
    where its holder could not keep its table (a full disk: it leaves an `.unkept` note), or past
    the wait limit (a holder hung with its heartbeat beating). Storage that does not answer is
    waited through for the stale window, as lease holders ride out an outage."""
    waits = waits or Waits()
    lease = Lease(parent.child(lease_location(name, key)), _process_name(), waits.stale_after_s, clock)
    rel, refused, unkept = cache_location(name, key), refusal_location(name, key), unkept_location(name, key)

    def build_and_keep() -> tuple[torch.Tensor | None, str | None, bool]:
        return _build_and_keep(parent, name, key, build, device, log)

    outage, noted, deadline = Outage(), None, clock() + waits.wait_limit_s
    while True:
        taken: bool | None = False
        beside = None  # why to compute them beside whoever holds the lease, if so
        try:  # storage's answers only: an error of the build is not an outage to wait through
            found = kept_outcome(parent, rel, refused, key, device)
            if found is None and parent.is_file(unkept):
                beside = "the run that computed them could not keep them"
            elif found is None and clock() > deadline:
                beside = f"waited {_duration(waits.wait_limit_s)} for the run computing them"
            elif found is None:
                taken = _take(lease, log)
                if taken:  # a holder that kept them and released the lease meanwhile
                    found = kept_outcome(parent, rel, refused, key, device)
            holder = lease.holder_now() if found is None and taken is False and beside is None else None
        except ResourceError as exc:
            if taken:
                lease.release()
            if outage.lasted(clock()) >= waits.stale_after_s:
                raise
            log(f"teacher targets: storage did not answer ({exc}); looking again")
            sleep(WAIT_POLL_S)
            continue
        outage.over()
        if beside is not None:
            log(f"teacher targets: {beside}; computing them here")
            return build_and_keep()
        if found is not None:
            if taken:
                lease.release()
            return (*found, False)
        if taken is None:
            return build_and_keep()
        if taken:
            try:
                with Heartbeat(lease, HEARTBEAT_S):
                    return build_and_keep()
            finally:
                lease.release()
        if noted is None or clock() - noted >= WAIT_NOTE_EVERY_S:
            log(f"teacher targets: {holder or 'another run'} is computing them; waiting for {parent.uri(rel)}")
            noted = clock()
        sleep(WAIT_POLL_S)


def kept_outcome(parent: Storage, rel: str, refused: str, key: str, device: torch.device):
    """(table, None) or (None, why refused) where a run kept either; None where neither is kept."""
    problem = _earlier_refusal(parent, refused, device)
    if problem is not None:
        return None, problem
    table = stored_table(parent, rel, key)
    return None if table is None else (table, None)


def _take(lease: Lease, log) -> bool | None:
    """Whether the lease was taken; None where storage refuses its record (a read-only grant, a
    full disk). Any other error is an outage (ResourceError, for the caller to wait through)."""
    for attempt in (1, 2):  # refused once: a record created whose read-back failed is ours, taken again
        try:
            return lease.try_acquire(gone=process_gone)
        except ResourceError as exc:
            if not any(words in str(exc) for words in _REFUSED_WRITES):
                raise
            if attempt == 2:
                log(f"teacher targets: no lease to take ({exc}); computing them without one")
    return None


# what storage says when it will not take the lease's record, whatever the retries: no lease here
_REFUSED_WRITES = ("AccessDenied", "Access Denied", "Permission denied", "Read-only file system", "No space left")


def _build_and_keep(
    parent: Storage,
    name: str,
    key: str,
    build: Callable[[], tuple[torch.Tensor | None, str | None]],
    device: torch.device,
    log,
) -> tuple[torch.Tensor | None, str | None, bool]:
    rel, refused, unkept = cache_location(name, key), refusal_location(name, key), unkept_location(name, key)
    table, problem = build()
    if problem is not None:  # never kept as a table: its key would serve it forever
        keep_refusal(parent, refused, problem, device, log)
        return None, problem, False
    assert table is not None  # a build without a problem gives a table
    kept = _keep_table(parent, rel, table, key, log)
    with contextlib.suppress(ResourceError):  # best effort: waiters then compute beside, not in turn
        if not kept:
            parent.write_text(unkept, "the run that computed these targets could not keep them")
        elif parent.is_file(unkept):  # kept at last (room made): runs share the lease again
            parent.delete_file(unkept)
    return table, None, True


def _process_name() -> str:
    return f"the run on {socket.gethostname()}, pid {os.getpid()} ({uuid.uuid4().hex[:8]})"


def _keep_table(parent: Storage, rel: str, table: torch.Tensor, key: str, log) -> bool:
    """Write the table for later runs. Best effort in a run of one worker, which holds the table
    already: a teacher in a folder this run may read but not write (`remem distill` from another's
    `s3://` checkpoint, a read-only grant) or a full disk would otherwise fail it, and each retry
    after computing the targets again. The other ranks of a DDP run read it back: there it must be."""
    try:
        if stored_table(parent, rel, key) is not None:
            return True  # kept meanwhile by a run computing beside this one: never replaced (readers)
        write_table(parent, rel, table, key)
        return True
    except ResourceError as exc:
        if is_distributed():
            raise
        log(f"teacher targets not kept ({exc}); this run uses them, the next one computes them again")
        return False


def _computed_on(device: torch.device) -> dict[str, str]:
    """What a refusal depends on besides the key: bf16 on CUDA, fp32 on CPU (a logit near float16's
    limit falls either side), and the torch build (a kernel's bug is a version's)."""
    return {"device": device.type, "torch": torch.__version__}


def _earlier_refusal(parent: Storage, refused: str, device: torch.device) -> str | None:
    """The refusal kept for these targets where they would be computed the same way again; None
    (compute them) where there is none, or it came from another device or torch build."""
    if not parent.is_file(refused):
        return None
    try:
        note = json.loads(parent.read_text(refused))
    except ValueError:  # unreadable: compute, and refuse or serve on what they are
        return None
    if not isinstance(note, dict) or not note.get("problem") or note.get("computed_on") != _computed_on(device):
        return None
    return f"{note['problem']} (refused before: {parent.uri(refused)}; remove it to compute them again)"


def keep_refusal(parent: Storage, refused: str, problem: str, device: torch.device, log) -> None:
    """Best effort: without the note a retry computes the targets again and refuses them again."""
    note = {"problem": problem, "computed_on": _computed_on(device)}
    try:
        parent.write_text(refused, json.dumps(note, indent=1))  # the same words from whoever writes it
    except Exception as exc:  # noqa: BLE001  the refusal itself must reach the run
        log(f"could not keep the refusal beside the cache ({exc}); a retry computes the targets again")


def non_finite(table: torch.Tensor, teacher_location: str) -> str | None:
    """Why targets with a NaN or an infinity are refused (None if there are none): served, they
    would fail the student as "diverged", recording that against the student's settings."""
    bad = non_finite_views(table)
    return refusal_words(bad, table.shape[0] * table.shape[1], teacher_location) if bad else None


def non_finite_views(table: torch.Tensor) -> int:
    # by chunks of images: a mask of the whole table would take half its size again (ImageNet, 8 views: 10 GB)
    return sum(int((~torch.isfinite(chunk)).flatten(2).any(dim=2).sum()) for chunk in table.split(4096))


def refusal_words(bad: int, views: int, teacher_location: str) -> str:
    return (
        f"student.teacher_targets: teacher {teacher_location} gives non-finite logits (NaN or beyond "
        f"float16's +-65504) for {bad} of {views} views; nothing cached: "
        f"use student.teacher_targets: online, or another teacher checkpoint"
    )
