"""Where a student's distillation targets come from: the teacher run online on every batch,
or a cache of the teacher's logits for a fixed set of augmented views of each image.

The cache trades augmentation variety (n views per image instead of a fresh one each epoch)
for never running the teacher during distillation. It is computed once per teacher
checkpoint, in eval mode and batched, and stored beside the checkpoint:

    <checkpoint parent>/targets/<checkpoint name>-<key>.pt        the table (float16)
    <checkpoint parent>/targets/<checkpoint name>-<key>.lease/    who computes it now: one run at a time
    <checkpoint parent>/targets/<checkpoint name>-<key>.refused   why its table was refused (non-finite)
    <checkpoint parent>/targets/<checkpoint name>-<key>.part-<run>-<rank>.pt   a DDP rank's share, until joined

The key hashes the checkpoint's model sha256 (from its manifest) and the meta fields that shape
its logits (architecture, classes, image size, MLP reweighting), the data spec and split
seed, the number of views and their seed, and the pipeline that draws the views (the device
pipeline and the DataLoader draw different pictures), so any change to those builds a new cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from remem_ray.checkpoints import MANIFEST_FILE, META_FILE, MODEL_FILE, CheckpointError
from remem_ray.config import DATA_FIELDS_WITHOUT_EFFECT, LEASE_STALE_AFTER_S, TEACHER_WAIT_TIMEOUT_S, RunSpec
from remem_ray.data.datasets import num_items
from remem_ray.data.pipeline import DataPipeline, Views
from remem_ray.errors import ResourceError
from remem_ray.leases import HEARTBEAT_S, Heartbeat, Lease, Outage, process_gone
from remem_ray.storage import Storage
from remem_ray.storage.fs import NotingFile
from remem_ray.teacher_layout import TARGETS_DIR
from remem_ray.train.common import autocast, is_distributed, rank0_says

CACHE_FORMAT = 1
WAIT_POLL_S = 2.0  # a run waiting for another's targets looks this often
WAIT_NOTE_EVERY_S = 30.0  # and says so this often


class TargetSource:
    """Supplies the teacher logits for a training batch."""

    views: Views | None = None  # fixed views the training batches must carry (index, view) for

    def __call__(self, images: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class OnlineTargets(TargetSource):
    """Runs the frozen teacher on the batch the student sees."""

    def __init__(self, teacher: nn.Module, normalizer: nn.Module, device: torch.device) -> None:
        self.teacher, self.normalizer, self.device = teacher, normalizer, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        with autocast(self.device):
            return self.teacher(self.normalizer(images)).float()


class CachedTargets(TargetSource):
    """Looks the batch's (index, view) pairs up in a precomputed logit table [N, views, classes]."""

    def __init__(self, table: torch.Tensor, views: Views, device: torch.device) -> None:
        self.table, self.views, self.device = table.to(device), views, device  # float16: small beside the model

    def __call__(self, images: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        index, view = (t.to(self.device, non_blocking=True) for t in extra)
        return self.table[index, view].float()


# --------------------------------------------------------------------------- the cache


def cache_key(spec: RunSpec, teacher: dict[str, Any], train_size: int, pipeline: str) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "teacher": teacher,
        "pipeline": pipeline,  # the two pipelines draw different views
        "data": spec.data.model_dump(mode="json", exclude=DATA_FIELDS_WITHOUT_EFFECT),
        "split_seed": spec.seed,
        "train_size": train_size,
        "views": spec.student.target_views,
        "view_seed": spec.student.target_view_seed,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_location(checkpoint_name: str, key: str) -> str:
    """Relative to the checkpoint's parent folder (the registry entry of a sweep's teacher)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.pt"


def lease_location(checkpoint_name: str, key: str) -> str:
    """The lease of the one run computing these targets (_built_once)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.lease"


def unkept_location(checkpoint_name: str, key: str) -> str:
    """A note that the run that computed these targets could not keep them (_built_once)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.unkept"


def part_location(checkpoint_name: str, key: str, run: str, rank: int) -> str:
    """A DDP rank's share of the table, until rank 0 joins the shares and removes them
    (`_built_by_every_rank`). `run` is drawn by rank 0: runs of one key may compute beside each
    other (past the wait limit, beside a holder that could not keep its table, a paused holder
    taken over), and none may read or remove another's parts."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.part-{run}-{rank}.pt"


def refusal_location(checkpoint_name: str, key: str) -> str:
    """Beside the cache: why its targets were refused (non-finite), so a retry of the run, or
    another trial of the same checkpoint and data, fails at once instead of computing them again
    (ImageNet x 8 views is many minutes of a GPU). The key holds the weights' sha256; the note,
    the device and torch build it held for (_computed_on)."""
    return f"{TARGETS_DIR}/{checkpoint_name}-{key}.refused"


# What, besides the weights, shapes a checkpoint's logits (meta.json's metrics do not).
LOGIT_SHAPING_META = ("model", "model_kwargs", "num_classes", "img_size", "reweighting")


def teacher_identity(checkpoint_storage: Storage, checkpoint_name: str) -> dict[str, Any]:
    """The weights' sha256 (from the manifest) and the meta fields that shape the logits: the
    same weights under another alpha or reweighting mode give other targets."""
    manifest = json.loads(checkpoint_storage.read_text(f"{checkpoint_name}/{MANIFEST_FILE}"))
    meta = json.loads(checkpoint_storage.read_text(f"{checkpoint_name}/{META_FILE}"))
    return {"model_sha256": manifest["files"][MODEL_FILE], **{k: meta.get(k) for k in LOGIT_SHAPING_META}}


TARGETS_BATCH = 256  # compute_targets' batch (remem_ray.train.memory_probe sizes GPU memory with it)


@torch.no_grad()
def compute_targets(
    teacher: nn.Module,
    normalizer: nn.Module,
    pipeline: DataPipeline,
    views: Views,
    batch_size: int = TARGETS_BATCH,
    images: range | None = None,
) -> torch.Tensor:
    """Teacher logits for every view of every training image (of `images`, a share of them):
    float16 [N, views, classes]."""
    teacher.eval()
    device = pipeline.device
    images = images if images is not None else range(num_items(pipeline.splits.train))
    table, row = None, 0  # filled in place: chunks and their concatenation took twice the table's size
    for batch in pipeline.view_batches(views, batch_size, images):
        with autocast(device):
            logits = teacher(normalizer(batch.to(device, non_blocking=True)))
        if table is None:
            table = torch.empty(len(images) * views.count, logits.shape[-1], dtype=torch.float16)
        table[row : row + len(logits)] = logits.float().cpu()
        row += len(logits)
    if table is None and not len(images):  # a share of no images (more ranks than images)
        return torch.empty(0, views.count, 0, dtype=torch.float16)
    if table is None:
        raise CheckpointError(f"student.teacher_targets: no views came for {len(images)} images")
    if row != len(table):  # rows left unfilled would be served as targets
        raise CheckpointError(
            f"student.teacher_targets: the views of {row // views.count} images came, not {len(images)}"
        )
    return table.view(len(images), views.count, -1)


def _keep(parent: Storage, rel: str, table: torch.Tensor, key: str) -> None:
    """Streamed: a table is up to 20 GB (ImageNet x 8 views), and its bytes in memory beside it
    (and a copy of them) tripled a rank's peak."""
    parent.write_with(rel, lambda f: torch.save({"key": key, "format": CACHE_FORMAT, "logits": table}, f))


def _read(parent: Storage, rel: str, key: str) -> torch.Tensor | None:
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


def load_or_build_targets(
    spec: RunSpec,
    teacher_location: str,
    teacher: nn.Module,
    normalizer: nn.Module,
    pipeline: DataPipeline,
    is_writer: bool,
    log=print,
    stale_after_s: float = LEASE_STALE_AFTER_S,
    wait_limit_s: float = TEACHER_WAIT_TIMEOUT_S,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cached logit table for this teacher checkpoint and data, building it if missing.

    One run at a time computes it across trials and sweeps (`_built_once`); a DDP run's ranks
    compute it together, each its share of the images (`_built_by_every_rank`). A holder
    silent for `stale_after_s` is taken over; past `wait_limit_s` a waiter computes them beside
    their holder (the sweep's lease settings).
    """
    from remem_ray.checkpoints import split_location

    parent, name = split_location(teacher_location, spec.storage.endpoint, spec.storage.region)
    size = num_items(pipeline.splits.train)
    # rank 0's key on every rank: a node with another torchvision build would look for another file
    key = _rank0_key(spec, parent, name, size, pipeline, teacher_location)
    rel = cache_location(name, key)
    views = Views(spec.student.target_views, spec.student.target_view_seed)
    info = {"key": key, "location": parent.uri(rel), "built": False}

    def compute(images: range | None = None) -> torch.Tensor:
        return compute_targets(teacher, normalizer, pipeline, views, images=images)

    table: torch.Tensor | None
    waits = Waits(stale_after_s, wait_limit_s)
    if is_distributed():
        table, info["built"] = _built_by_every_rank(
            parent, name, key, compute, pipeline, views, teacher_location, log, waits
        )
    else:
        table = _stored_table(parent, rel, key)
        if table is None and is_writer:

            def build() -> tuple[torch.Tensor, str | None]:
                log(f"computing teacher targets: {size} images x {views.count} views -> {info['location']}")
                built = compute()
                return built, _non_finite(built, teacher_location)

            table, problem, info["built"] = _built_once(parent, name, key, build, pipeline.device, log, waits)
            if problem is not None:
                raise CheckpointError(problem)
    problem = _rows_problem(table, size, parent.uri(rel))
    if problem is not None:  # a DDP run's ranks have heard it already (_built_by_every_rank)
        raise CheckpointError(problem)
    assert table is not None
    if not info["built"]:  # read: a cache written before this check existed (every rank reads the same)
        problem = _non_finite(table, teacher_location)
        if problem is not None:
            raise CheckpointError(problem)
    return table, info


def _built_by_every_rank(
    parent: Storage,
    name: str,
    key: str,
    compute: Callable[[range], torch.Tensor],
    pipeline: DataPipeline,
    views: Views,
    teacher_location: str,
    log,
    waits: Waits,
) -> tuple[torch.Tensor | None, bool]:
    """(table, built here) for a DDP run. Rank 0 looks, waits and takes the lease as one run does
    (`_built_once`), saying at each step what the other ranks do: wait, compute their share of
    the images (kept as parts, which rank 0 joins into the table), or read the table.

    Before, rank 0 computed the whole table while the others waited in one collective, which Ray
    Train ends after 30 minutes (ImageNet x 8 views of a ViT-B on one card is about an hour), and
    took no lease. Now every collective follows a short step, or work of equal length on every
    rank; a failure anywhere is heard on every rank, so none is left waiting at the next one."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), pipeline.device
    if device.type == "cuda":  # collectives of objects use the current device
        torch.cuda.set_device(device)
    size, rel = num_items(pipeline.splits.train), cache_location(name, key)
    if rank != 0:
        return _follow_rank_0(parent, name, key, compute, size, views, device)
    # whether the other ranks know of a failure without being told: one inside a step every rank
    # takes is raised on every rank; a collective that failed leaves nobody to tell
    heard = False

    def say(word: tuple[str, Any]) -> None:
        nonlocal heard
        heard = True
        rank0_says(word, device)
        heard = False

    def sleep(seconds: float) -> None:
        say(("wait", None))
        time.sleep(seconds)

    def build() -> tuple[torch.Tensor | None, str | None]:
        nonlocal heard
        shares = f"a share on each of {world} ranks"
        log(f"computing teacher targets: {size} images x {views.count} views, {shares} -> {parent.uri(rel)}")
        run = uuid.uuid4().hex[:8]
        say(("build", (size, run)))
        try:
            heard = True
            own, bad = _share(parent, name, key, run, compute, size, size, views)
            heard = False
            if bad:
                return None, _refusal_words(bad, size * views.count, teacher_location)
            return _joined(parent, name, key, run, own, world, size, views), None
        finally:  # joined or not (best effort: a part left is never read again)
            for other in range(1, world):
                with contextlib.suppress(ResourceError):
                    parent.delete_file(part_location(name, key, run, other))

    try:
        table, problem, built = _built_once(parent, name, key, build, device, log, waits, sleep)
    except Exception as exc:
        if not heard:
            rank0_says(("failed", f"student.teacher_targets: rank 0 could not build the cache: {exc}"), device)
        raise
    rank0_says(("refused", problem) if problem is not None else ("done", built), device)
    if problem is not None:
        raise CheckpointError(problem)
    _every_rank_hears(_rows_problem(table, size, parent.uri(rel)), None)  # whether every rank read the table
    return table, built


def _follow_rank_0(
    parent: Storage,
    name: str,
    key: str,
    compute: Callable[[range], torch.Tensor],
    size: int,
    views: Views,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """A DDP rank other than 0: does what rank 0 says, step by step (`_built_by_every_rank`)."""
    while True:
        word: tuple[str, Any] = rank0_says(("", None), device)  # the argument: rank 0's alone counts
        state, detail = word
        if state == "build":
            rank0_size, run = detail
            _share(parent, name, key, run, compute, size, rank0_size, views)
        elif state in ("failed", "refused"):
            raise CheckpointError(detail)
        elif state == "done":
            break
    rel, table, problem, failure = cache_location(name, key), None, None, None
    try:
        table = _stored_table(parent, rel, key)
        problem = _rows_problem(table, size, parent.uri(rel))
    except Exception as exc:
        failure, problem = exc, f"student.teacher_targets: rank {dist.get_rank()} could not read the cache: {exc}"
    _every_rank_hears(problem, failure)
    return table, bool(detail)


def _rank0_key(
    spec: RunSpec, parent: Storage, name: str, size: int, pipeline: DataPipeline, teacher_location: str
) -> str:
    """The cache key, as rank 0 makes it, on every rank; an error making it, raised on every rank."""
    key, failure = None, None
    if not is_distributed() or dist.get_rank() == 0:
        try:
            key = cache_key(spec, teacher_identity(parent, name), size, pipeline.identity())
        except Exception as exc:  # a teacher's manifest that does not read: the others must hear of it
            failure = exc
    problem = None if failure is None else f"student.teacher_targets: teacher {teacher_location}: {failure}"
    key, problem = rank0_says((key, problem), pipeline.device)
    if failure is not None:
        raise failure
    if problem is not None:
        raise CheckpointError(problem)
    assert key is not None
    return key


def _rows_problem(table: torch.Tensor | None, size: int, location: str) -> str | None:
    if table is None:
        return f"student.teacher_targets: cache {location} could not be read"
    if table.shape[0] != size:
        return f"student.teacher_targets: cache holds {table.shape[0]} images, the training set {size}"
    return None


def _share(
    parent: Storage,
    name: str,
    key: str,
    run: str,
    compute: Callable[[range], torch.Tensor],
    size: int,
    rank0_size: int,
    views: Views,
) -> tuple[torch.Tensor | None, int]:
    """Every rank: the targets of its share of the images, kept as a part (rank 0 keeps its own
    in memory); (rank 0's part, non-finite views on all ranks). Raises on every rank if any failed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    part, bad, problem, failure = None, 0, None, None
    try:
        if size != rank0_size:
            raise CheckpointError(f"rank {rank}'s training set holds {size} images, rank 0's {rank0_size}")
        part = compute(_share_of(rank, world, size))
        bad = _non_finite_views(part)
        if rank != 0:
            _keep(parent, part_location(name, key, run, rank), part, key)
            part = None
    except Exception as exc:
        failure, problem = exc, f"student.teacher_targets: rank {rank} could not compute its share of the cache: {exc}"
    heard: list[Any] = [None] * world
    dist.all_gather_object(heard, (problem, bad))
    _raise_first(problem, failure, [words for words, _ in heard])
    return part, sum(count for _, count in heard)


def _every_rank_hears(problem: str | None, failure: Exception | None) -> None:
    """Every rank: raises (its own error, or the first rank's words) if any rank had a problem."""
    heard: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(heard, problem)
    _raise_first(problem, failure, heard)


def _raise_first(own: str | None, failure: Exception | None, heard: list[str | None]) -> None:
    first = next((words for words in heard if words), None)
    if first is None:
        return
    if own and failure is not None:
        raise failure
    raise CheckpointError(first)


def _share_of(rank: int, world: int, size: int) -> range:
    return range(rank * size // world, (rank + 1) * size // world)


def _joined(
    parent: Storage, name: str, key: str, run: str, own: torch.Tensor | None, world: int, size: int, views: Views
) -> torch.Tensor:
    """The ranks' parts in one table, filled in place (a list of parts and their concatenation
    took twice the table's size: 40 GB for ImageNet x 8 views)."""
    table = None
    for rank in range(world):
        share = _share_of(rank, world, size)
        location = part_location(name, key, run, rank)
        part = own if rank == 0 else _read(parent, location, key)
        if part is None:
            raise CheckpointError(f"student.teacher_targets: rank {rank}'s share {parent.uri(location)} does not read")
        if tuple(part.shape[:2]) != (len(share), views.count):
            raise CheckpointError(
                f"student.teacher_targets: rank {rank}'s share holds {tuple(part.shape[:2])} (images, views), "
                f"not {(len(share), views.count)}"
            )
        if len(share):
            if table is None:
                table = torch.empty(size, views.count, part.shape[2], dtype=part.dtype)
            table[share.start : share.stop] = part
        del part
    assert table is not None  # some rank's share holds an image: the training set is not empty
    return table


def _stored_table(parent: Storage, rel: str, key: str) -> torch.Tensor | None:
    return _read(parent, rel, key) if parent.is_file(rel) else None


def _built_once(
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
            found = _kept(parent, rel, refused, key, device)
            if found is None and parent.is_file(unkept):
                beside = "the run that computed them could not keep them"
            elif found is None and clock() > deadline:
                beside = f"waited {_duration(waits.wait_limit_s)} for the run computing them"
            elif found is None:
                taken = _take(lease, log)
                if taken:  # a holder that kept them and released the lease meanwhile
                    found = _kept(parent, rel, refused, key, device)
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


@dataclass(frozen=True)
class Waits:
    """How long a run waits on another's targets: its lease's stale window, then its limit."""

    stale_after_s: float = LEASE_STALE_AFTER_S
    wait_limit_s: float = TEACHER_WAIT_TIMEOUT_S


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _kept(parent: Storage, rel: str, refused: str, key: str, device: torch.device):
    """(table, None) or (None, why refused) where a run kept either; None where neither is kept."""
    problem = _earlier_refusal(parent, refused, device)
    if problem is not None:
        return None, problem
    table = _stored_table(parent, rel, key)
    return None if table is None else (table, None)


# what storage says when it will not take the lease's record, whatever the retries: no lease here
_REFUSED_WRITES = ("AccessDenied", "Access Denied", "Permission denied", "Read-only file system", "No space left")


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
        _keep_refusal(parent, refused, problem, device, log)
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
        if parent.is_file(rel) and _read(parent, rel, key) is not None:
            return True  # kept meanwhile by a run computing beside this one: never replaced (readers)
        _keep(parent, rel, table, key)
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


def _keep_refusal(parent: Storage, refused: str, problem: str, device: torch.device, log) -> None:
    """Best effort: without the note a retry computes the targets again and refuses them again."""
    note = {"problem": problem, "computed_on": _computed_on(device)}
    try:
        parent.write_text(refused, json.dumps(note, indent=1))  # the same words from whoever writes it
    except Exception as exc:  # noqa: BLE001  the refusal itself must reach the run
        log(f"could not keep the refusal beside the cache ({exc}); a retry computes the targets again")


def _non_finite(table: torch.Tensor, teacher_location: str) -> str | None:
    """Why targets with a NaN or an infinity are refused (None if there are none): served, they
    would fail the student as "diverged", recording that against the student's settings."""
    bad = _non_finite_views(table)
    return _refusal_words(bad, table.shape[0] * table.shape[1], teacher_location) if bad else None


def _non_finite_views(table: torch.Tensor) -> int:
    # by chunks of images: a mask of the whole table would take half its size again (ImageNet, 8 views: 10 GB)
    return sum(int((~torch.isfinite(chunk)).flatten(2).any(dim=2).sum()) for chunk in table.split(4096))


def _refusal_words(bad: int, views: int, teacher_location: str) -> str:
    return (
        f"student.teacher_targets: teacher {teacher_location} gives non-finite logits (NaN or beyond "
        f"float16's +-65504) for {bad} of {views} views; nothing cached: "
        f"use student.teacher_targets: online, or another teacher checkpoint"
    )
