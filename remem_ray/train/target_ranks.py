"""A DDP run's teacher targets, computed by all its ranks (remem_ray.train.targets): rank 0 looks,
waits and takes the lease as one run does (target_cache.built_once), saying each step to the
others in a short broadcast; every rank computes the views of its share of the images, kept as a
part that rank 0 joins. Every rank makes the same collectives in the same order on every path."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from remem_ray.checkpoints import CheckpointError
from remem_ray.data.datasets import num_items
from remem_ray.data.pipeline import DataPipeline, Views
from remem_ray.errors import ResourceError
from remem_ray.storage import Storage
from remem_ray.train.common import rank0_says
from remem_ray.train.target_cache import (
    Waits,
    built_once,
    cache_location,
    non_finite_views,
    part_location,
    read_table,
    refusal_words,
    rows_problem,
    stored_table,
    write_table,
)


def built_by_every_rank(
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
    (`built_once`), saying at each step what the other ranks do: wait, compute their share of
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
                return None, refusal_words(bad, size * views.count, teacher_location)
            return _joined(parent, name, key, run, own, world, size, views), None
        finally:  # joined or not (best effort: a part left is never read again)
            for other in range(1, world):
                with contextlib.suppress(ResourceError):
                    parent.delete_file(part_location(name, key, run, other))

    try:
        table, problem, built = built_once(parent, name, key, build, device, log, waits, sleep)
    except Exception as exc:
        if not heard:
            rank0_says(("failed", f"student.teacher_targets: rank 0 could not build the cache: {exc}"), device)
        raise
    rank0_says(("refused", problem) if problem is not None else ("done", built), device)
    if problem is not None:
        raise CheckpointError(problem)
    _every_rank_hears(rows_problem(table, size, parent.uri(rel)), None)  # whether every rank read the table
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
    """A DDP rank other than 0: does what rank 0 says, step by step (`built_by_every_rank`)."""
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
        table = stored_table(parent, rel, key)
        problem = rows_problem(table, size, parent.uri(rel))
    except Exception as exc:
        failure, problem = exc, f"student.teacher_targets: rank {dist.get_rank()} could not read the cache: {exc}"
    _every_rank_hears(problem, failure)
    return table, bool(detail)


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
        bad = non_finite_views(part)
        if rank != 0:
            write_table(parent, part_location(name, key, run, rank), part, key)
            part = None
    except Exception as exc:
        failure, problem = exc, f"student.teacher_targets: rank {rank} could not compute its share of the cache: {exc}"
    return part, sum(_every_rank_hears(problem, failure, bad))


def _every_rank_hears(problem: str | None, failure: Exception | None, value: Any = None) -> list[Any]:
    """Every rank: raises (its own error, or the first rank's words) if any rank had a problem;
    else every rank's `value`, in rank order."""
    heard: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(heard, (problem, value))
    first = next((words for words, _ in heard if words), None)
    if first is not None:
        raise failure if problem and failure is not None else CheckpointError(first)
    return [value for _, value in heard]


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
        part = own if rank == 0 else read_table(parent, location, key)
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
