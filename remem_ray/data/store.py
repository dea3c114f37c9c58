"""The uint8 image store: every image of a split decoded once, at one stored resolution.

Equal square images no larger than the default side (img_size / 0.875) keep their native size
(digits, CIFAR and SVHN at 32 px, a folder of 32-px PNGs); others are resized (short side
`data.store_size`, default img_size / 0.875) with PIL's antialiasing and centre-cropped to a
square, so random crops are drawn from the central square of each image and the device-side
resampling (no antialiasing) never shrinks a stored image by more than 1/0.875.
Decoded PIL datasets are cached as .npy files under the cache folder, keyed by dataset, split
seed, split and resolution, built once per node under a file lock and memory-mapped by every
trial there; in-memory tensor datasets (digits, synthetic) are converted directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from remem_ray.data.datasets import TensorImages, TransformedSubset, dataset_targets, num_items
from remem_ray.storage import cache_root

if TYPE_CHECKING:
    from remem_ray.config import DataConfig

STORE_FORMAT = 1
_PROBE = 32  # images looked at to decide native vs resized


@dataclass
class ImageStore:
    """One split: uint8 images [N, 3, S, S] and int64 labels [N], on one device (or memory-mapped)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def to(self, device: torch.device) -> ImageStore:
        return ImageStore(self.images.to(device), self.labels.to(device))


# --------------------------------------------------------------------------- what a split is made of


def _base_and_indices(ds: Dataset, indices: np.ndarray | None = None) -> tuple[Dataset, np.ndarray]:
    """(the dataset holding the images, indices into it) through Subset layers."""
    if isinstance(ds, Subset):
        inner = np.asarray(ds.indices)
        return _base_and_indices(ds.dataset, inner if indices is None else inner[indices])
    return ds, np.arange(num_items(ds)) if indices is None else indices


def is_in_memory(ds: Dataset) -> bool:
    return isinstance(_base_and_indices(ds)[0], TensorImages)


def _pil_items(ds: Dataset) -> tuple[Dataset, np.ndarray]:
    base, idx = _base_and_indices(ds)
    if not isinstance(base, TransformedSubset):
        raise TypeError(f"no image store for {type(base).__name__}")
    return base.base, base.indices[idx]


def store_side(ds: Dataset, cfg: DataConfig) -> int:
    """The stored resolution of a split (see the module docstring)."""
    base, idx = _base_and_indices(ds)
    if isinstance(base, TensorImages):
        return int(base.images.shape[-1])
    if cfg.store_size is not None:
        return cfg.store_size
    default = int(math.ceil(cfg.img_size / 0.875))
    pil_base, items = _pil_items(ds)
    sizes = {pil_base[int(i)][0].size for i in items[:_PROBE]}
    if len(sizes) == 1:
        ((w, h),) = sizes
        if w == h <= default:
            return w
    return default


def store_bytes(sizes: dict[str, int], side: int) -> int:
    return sum(sizes.values()) * 3 * side * side


def _square(img, side: int) -> np.ndarray:
    """PIL image -> uint8 HWC side x side: short side resized to `side`, centre-cropped."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (side, side):
        scale = side / min(w, h)
        nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - side) // 2, (nh - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8)


def _decoded_images(ds: Dataset, side: int) -> Iterator[np.ndarray]:
    """The split's PIL images, in order, as uint8 CHW arrays squared to `side`."""
    pil_base, items = _pil_items(ds)
    for i in items:
        yield _square(pil_base[int(i)][0], side).transpose(2, 0, 1)


def _from_tensors(ds: Dataset) -> ImageStore:
    base, idx = _base_and_indices(ds)
    assert isinstance(base, TensorImages)  # is_in_memory said so
    index = torch.as_tensor(idx, dtype=torch.long)
    images = (base.images[index] * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return ImageStore(images.expand(-1, 3, -1, -1).contiguous(), base.labels[index].long())


# --------------------------------------------------------------------------- the on-disk cache


def store_key(cfg: DataConfig, seed: int, split: str, side: int, size: int) -> str:
    payload = {
        "format": STORE_FORMAT,
        "seed": seed,
        "split": split,
        "side": side,
        "size": size,
        "data": cfg.model_dump(
            mode="json", include={"name", "root", "img_size", "val_fraction", "test_fraction", "max_train_samples"}
        ),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _open(folder: Path) -> ImageStore:
    # copy-on-write map: torch wants a writable array; nothing is ever written back
    images = np.load(folder / "images.npy", mmap_mode="c")
    labels = np.load(folder / "labels.npy")
    return ImageStore(torch.from_numpy(images), torch.from_numpy(labels).long())


def load_or_build(ds: Dataset, cfg: DataConfig, seed: int, split: str, side: int, log=print) -> tuple[ImageStore, bool]:
    """(the split's store, whether this call built it). Decoded datasets go through the cache."""
    if is_in_memory(ds):
        return _from_tensors(ds), True
    folder = cache_root() / "stores" / store_key(cfg, seed, split, side, num_items(ds))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait, then map it
        if (folder / ".complete").exists():
            return _open(folder), False
        log(f"decoding {split}: {num_items(ds)} images -> uint8 {side}x{side} store in {folder}")
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.partial-"))
        try:
            images = np.lib.format.open_memmap(
                staging / "images.npy", mode="w+", dtype=np.uint8, shape=(num_items(ds), 3, side, side)
            )
            for i, image in enumerate(_decoded_images(ds, side)):
                images[i] = image
            images.flush()
            del images
            np.save(staging / "labels.npy", dataset_targets(ds).astype(np.int64))
            (staging / ".complete").write_text("ok")
            shutil.rmtree(folder, ignore_errors=True)  # a partial build from a crash
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _open(folder), True
