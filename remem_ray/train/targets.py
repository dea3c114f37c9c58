"""Where a student's distillation targets come from: the teacher run online on every batch,
or a cache of the teacher's logits for a fixed set of augmented views of each image.

The cache trades augmentation variety (n views per image instead of a fresh one each epoch)
for never running the teacher during distillation. It is computed once per teacher
checkpoint, in eval mode and batched, and stored beside the checkpoint:

    <checkpoint parent>/targets/<checkpoint name>-<key>.pt

The key hashes the checkpoint's model sha256 (from its manifest), the data spec and split
seed, the number of views and their seed, so any change to those builds a new cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from remem_ray.checkpoints import MANIFEST_FILE, CheckpointError, MODEL_FILE
from remem_ray.config import RunSpec
from remem_ray.storage import Storage
from remem_ray.train.common import autocast, is_distributed, loader_workers

TARGETS_DIR = "targets"
CACHE_FORMAT = 1


def _view_seed(view_seed: int, index: int, view: int) -> int:
    return (view_seed * 1_000_003 + index * 1_009 + view) % (2**63 - 1)


class FixedViews(Dataset):
    """A training set whose augmentation is one of `n_views` fixed draws per image.

    Item i is augmented under a torch RNG seeded by (view_seed, i, view), so view v of image i
    is the same picture whenever it is drawn; torchvision's and our tensor augmentations both
    draw from torch's RNG. Which view an epoch sees is drawn from the loader's RNG.
    Items are (image, label, index, view).
    """

    def __init__(self, base: Dataset, n_views: int, view_seed: int) -> None:
        self.base, self.n_views, self.view_seed = base, n_views, view_seed

    def __len__(self) -> int:
        return len(self.base)

    def view(self, index: int, view: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_view_seed(self.view_seed, index, view))  # CPU only: fast
            return self.base[index]

    def __getitem__(self, index: int):
        view = int(torch.randint(self.n_views, ()))
        image, label = self.view(index, view)
        return image, label, index, view


class _AllViews(Dataset):
    """Every (image, view) pair once, for computing the cache."""

    def __init__(self, views: FixedViews) -> None:
        self.views = views

    def __len__(self) -> int:
        return len(self.views) * self.views.n_views

    def __getitem__(self, flat: int):
        index, view = divmod(flat, self.views.n_views)
        return self.views.view(index, view)[0]


class TargetSource:
    """Supplies the teacher logits for a training batch."""

    def train_dataset(self, dataset: Dataset) -> Dataset:
        return dataset

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

    def __init__(self, table: torch.Tensor, n_views: int, view_seed: int, device: torch.device) -> None:
        self.table, self.n_views, self.view_seed = table, n_views, view_seed
        self.device = device

    def train_dataset(self, dataset: Dataset) -> Dataset:
        if len(dataset) != self.table.shape[0]:
            raise CheckpointError(f"student.teacher_targets: cache holds {self.table.shape[0]} images, "
                                  f"the training set {len(dataset)}")
        return FixedViews(dataset, self.n_views, self.view_seed)

    def __call__(self, images: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        index, view = extra
        return self.table[index, view].to(self.device, non_blocking=True).float()


# --------------------------------------------------------------------------- the cache


def cache_key(spec: RunSpec, model_sha256: str, train_size: int) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "checkpoint_model_sha256": model_sha256,
        "data": spec.data.model_dump(mode="json", exclude={"num_workers", "download"}),
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


def model_sha256(checkpoint_storage: Storage, checkpoint_name: str) -> str:
    manifest = json.loads(checkpoint_storage.read_text(f"{checkpoint_name}/{MANIFEST_FILE}"))
    return manifest["files"][MODEL_FILE]


@torch.no_grad()
def compute_targets(teacher: nn.Module, normalizer: nn.Module, views: FixedViews, device: torch.device,
                    batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """Teacher logits for every view of every image: float16 [N, views, classes]."""
    teacher.eval()
    loader = DataLoader(_AllViews(views), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    chunks = []
    for images in loader:
        with autocast(device):
            logits = teacher(normalizer(images.to(device, non_blocking=True)))
        chunks.append(logits.float().cpu().to(torch.float16))
    table = torch.cat(chunks)
    return table.view(len(views), views.n_views, -1)


def _encode(table: torch.Tensor, key: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"key": key, "format": CACHE_FORMAT, "logits": table}, buf)
    return buf.getvalue()


def _decode(data: bytes, key: str) -> torch.Tensor | None:
    """The table if the file is whole and for this key; None if it must be rebuilt."""
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # truncated or corrupt: rebuild rather than trust it
        return None
    if not isinstance(blob, dict) or blob.get("key") != key or blob.get("format") != CACHE_FORMAT:
        return None
    return blob["logits"]


def load_or_build_targets(spec: RunSpec, teacher_location: str, teacher: nn.Module, normalizer: nn.Module,
                          train_set: Dataset, device: torch.device, is_writer: bool,
                          log=print) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cached logit table for this teacher checkpoint and data, building it if missing.

    Rank 0 builds and writes; other ranks wait at a barrier and read. Two trials building the
    same cache at once both write the same bytes (each write replaces the file whole).
    """
    from remem_ray.checkpoints import split_location

    parent, name = split_location(teacher_location, spec.storage.endpoint)
    key = cache_key(spec, model_sha256(parent, name), len(train_set))
    rel = cache_location(name, key)
    views = FixedViews(train_set, spec.student.target_views, spec.student.target_view_seed)
    info = {"key": key, "location": parent.uri(rel), "built": False}
    table = _decode(parent.read_bytes(rel), key) if parent.is_file(rel) else None
    if table is None and is_writer:
        log(f"computing teacher targets: {len(views)} images x {views.n_views} views -> {info['location']}")
        table = compute_targets(teacher, normalizer, views, device,
                                num_workers=loader_workers(spec.data.num_workers, device))
        parent.write_bytes(rel, _encode(table, key))
        info["built"] = True
    if is_distributed():
        torch.distributed.barrier()
        if table is None:
            table = _decode(parent.read_bytes(rel), key)
    if table is None:
        raise CheckpointError(f"student.teacher_targets: cache {info['location']} could not be read")
    return table, info
