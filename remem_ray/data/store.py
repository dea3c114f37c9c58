"""The uint8 image store: every image of a split decoded once, at one stored resolution.

Equal square images no larger than the default side (img_size / 0.875) keep their native size
(digits, CIFAR and SVHN at 32 px, a folder of 32-px PNGs); others are resized (short side
`data.store_size`, default img_size / 0.875) with PIL's antialiasing and centre-cropped to a
square, so random crops are drawn from the central square of each image and the device-side
resampling (no antialiasing) never shrinks a stored image by more than 1/0.875.
Decoded PIL datasets are cached as .npy files under the cache folder, keyed by dataset, split
seed, split, resolution and the files the images come from (resolved folder; names, sizes and
mtimes), built once per node under a file lock and memory-mapped by every trial there; in-memory
tensor datasets (digits, synthetic) are converted directly.
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

STORE_FORMAT = 2
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
    # spread over the split: its items are sorted by class, and the first few of one class may
    # all be small squares while the others are not (they were then all shrunk to that size)
    probe = items[np.unique(np.linspace(0, len(items) - 1, num=min(_PROBE, len(items))).astype(int))]
    sizes = {pil_base[int(i)][0].size for i in probe}
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


def _listed_files(base: Dataset, root: str) -> list[tuple[str, str]]:
    """(path, label) of each file a dataset reads: its samples where it lists them (ImageFolder),
    else every file in the folder it names under its root (torchvision's base_folder), else the
    files directly in its root (SVHN's). Never a walk of the whole root: it may hold other
    datasets, or results that change while this one is read."""
    samples = getattr(base, "samples", None)
    if samples is not None:
        return [(str(path), str(label)) for path, label in samples]
    own = getattr(base, "base_folder", None) or getattr(base, "_base_folder", None)
    if own is not None and os.path.isdir(os.path.join(root, own)):
        walked = os.walk(os.path.join(root, own))
        return sorted(
            (os.path.join(folder, name), "") for folder, _, names in walked for name in names if not _hidden(name)
        )
    return sorted((entry.path, "") for entry in os.scandir(root) if entry.is_file() and not _hidden(entry.name))


def _hidden(name: str) -> bool:
    """Dot-files are no dataset's images: our own download locks (`.remem-<name>.lock`, rewritten
    by every `data.download` build) sit among SVHN's files, whose store was then decoded anew
    on every run."""
    return name.startswith(".")


def source_identity(base: Dataset, times: bool = True) -> dict[str, str] | None:
    """What a PIL dataset's images are read from: its resolved root and a fingerprint of its files
    (name, label, size, mtime), so a moved, relabelled or rewritten image makes another store;
    None for a dataset without a root folder. An s3:// root is read from its fetched copy, whose
    folder is keyed by endpoint and URI. Without `times`, the same of any copy of the files (every
    node's own download has its own mtimes)."""
    root = getattr(base, "root", None)
    if root is None or not os.path.isdir(root):
        return None
    root = os.path.abspath(root)
    digest = hashlib.sha256()
    for path, label in _listed_files(base, root):
        stat = os.stat(path)
        name = os.path.relpath(os.path.abspath(path), root)
        when = f"\t{stat.st_mtime_ns}" if times else ""
        digest.update(f"{name}\t{label}\t{stat.st_size}{when}\n".encode())
    return {"root": str(Path(root).resolve()), "files": digest.hexdigest()}


def content_identity(ds: Dataset) -> str | None:
    """A fingerprint of the files a split's images come from (names, labels, sizes; not where they
    lie nor when they were written), the same on every node holding a copy: for keys of what is
    stored for all of them (teacher targets). None for in-memory data (digits, synthetic)."""
    base = _base_and_indices(ds)[0]
    if not isinstance(base, TransformedSubset):  # in memory, or a registered builder's own kind
        return None
    source = source_identity(base.base, times=False)
    return None if source is None else source["files"]


def split_sources(splits: dict[str, Dataset]) -> dict[str, dict[str, str] | None]:
    """source_identity of each split's PIL dataset, each distinct dataset looked at once."""
    seen: dict[int, dict[str, str] | None] = {}
    sources: dict[str, dict[str, str] | None] = {}
    for name, ds in splits.items():
        if is_in_memory(ds):
            sources[name] = None
            continue
        base = _pil_items(ds)[0]
        if id(base) not in seen:
            seen[id(base)] = source_identity(base)
        sources[name] = seen[id(base)]
    return sources


def store_key(cfg: DataConfig, seed: int, split: str, side: int, size: int, source: dict[str, str] | None) -> str:
    payload = {
        "format": STORE_FORMAT,
        "seed": seed,
        "split": split,
        "side": side,
        "size": size,
        "source": source,
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


def load_or_build(
    ds: Dataset, cfg: DataConfig, seed: int, split: str, side: int, log=print, source: dict[str, str] | None = None
) -> tuple[ImageStore, bool]:
    """(the split's store, whether this call built it). Decoded datasets go through the cache.

    source: the split's source_identity where the caller has it (split_sources), else looked up.
    """
    if is_in_memory(ds):
        return _from_tensors(ds), True
    if source is None:
        source = source_identity(_pil_items(ds)[0])
    folder = cache_root() / "stores" / store_key(cfg, seed, split, side, num_items(ds), source)
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
