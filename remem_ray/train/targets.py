"""Where a student's distillation targets come from: the teacher run online on every batch,
or a cache of the teacher's logits for a fixed set of augmented views of each image.

The cache trades augmentation variety (n views per image instead of a fresh one each epoch)
for never running the teacher during distillation. It is computed once per teacher
checkpoint, in eval mode and batched, and stored beside the checkpoint:

    <checkpoint parent>/targets/<checkpoint name>-<key>.pt        (remem_ray.train.target_cache)

One run at a time computes it (target_cache.built_once); a DDP run's ranks together
(remem_ray.train.target_ranks).

The key hashes the checkpoint's model sha256 (from its manifest) and the meta fields that shape
its logits (architecture, classes, image size, MLP reweighting), the data spec and split
seed, the number of views and their seed, and the pipeline that draws the views (the device
pipeline and the DataLoader draw different pictures), so any change to those builds a new cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from remem_ray.checkpoints import MANIFEST_FILE, META_FILE, MODEL_FILE, CheckpointError
from remem_ray.config import DATA_FIELDS_WITHOUT_EFFECT, LEASE_STALE_AFTER_S, TEACHER_WAIT_TIMEOUT_S, RunSpec
from remem_ray.data.datasets import num_items
from remem_ray.data.pipeline import DataPipeline, Views
from remem_ray.data.store import content_identity
from remem_ray.storage import Storage
from remem_ray.train.common import autocast, is_distributed, rank0_says
from remem_ray.train.target_cache import (
    CACHE_FORMAT,
    Waits,
    built_once,
    cache_location,
    non_finite,
    rows_problem,
    stored_table,
)
from remem_ray.train.target_ranks import built_by_every_rank


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


def cache_key(
    spec: RunSpec, teacher: dict[str, Any], train_size: int, pipeline: str, content: str | None = None
) -> str:
    """content: the training images' files (`store.content_identity`): an image folder relabelled
    or with images replaced, at the same count, paired its stored rows with other pictures."""
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
    if content is not None:  # in-memory data (digits, synthetic) keeps the keys it had
        payload["content"] = content
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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

    One run at a time computes it across trials and sweeps (`built_once`); a DDP run's ranks
    compute it together, each its share of the images (`built_by_every_rank`). A holder
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
        table, info["built"] = built_by_every_rank(
            parent, name, key, compute, pipeline, views, teacher_location, log, waits
        )
    else:
        table = stored_table(parent, rel, key)
        if table is None and is_writer:

            def build() -> tuple[torch.Tensor, str | None]:
                log(f"computing teacher targets: {size} images x {views.count} views -> {info['location']}")
                built = compute()
                return built, non_finite(built, teacher_location)

            table, problem, info["built"] = built_once(parent, name, key, build, pipeline.device, log, waits)
            if problem is not None:
                raise CheckpointError(problem)
    problem = rows_problem(table, size, parent.uri(rel))
    if problem is not None:  # a DDP run's ranks have heard it already (target_ranks)
        raise CheckpointError(problem)
    assert table is not None
    if not info["built"]:  # read: a cache written before this check existed (every rank reads the same)
        problem = non_finite(table, teacher_location)
        if problem is not None:
            raise CheckpointError(problem)
    return table, info


def _rank0_key(
    spec: RunSpec, parent: Storage, name: str, size: int, pipeline: DataPipeline, teacher_location: str
) -> str:
    """The cache key, as rank 0 makes it, on every rank; an error making it, raised on every rank."""
    key, failure = None, None
    if not is_distributed() or dist.get_rank() == 0:
        try:
            content = content_identity(pipeline.splits.train)
            key = cache_key(spec, teacher_identity(parent, name), size, pipeline.identity(), content)
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
