"""Where a loop's batches come from: one `DataPipeline` per run, two strategies.

- `DevicePipeline`: the splits decoded once into uint8 stores (remem_ray.data.store), held on
  the training device where they fit `data.store_budget_gb`, else memory-mapped on the host
  with batches gathered into pinned buffers; augmentation in batches on the device. Only
  uint8 crosses the bus, and no worker processes decode images every epoch.
- `LoaderPipeline`: torchvision transforms per image in DataLoader workers: the reference
  path, and the fallback for what does not fit.

`data.pipeline: auto` takes the device pipeline on CUDA when the store fits the budget, the
loader elsewhere. Both yield (images float [B, 3, S, S] in [0, 1], labels[, index, view]),
shard training data by rank (equal shares) and give each rank a strided share of eval data
without padding, so summed eval counts stay exact. The shuffle order of epoch e is a function
of (seed, e) in both: a resumed run continues the same sequence.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from remem_ray.data.augment import (
    EvalResize,
    TrainAugment,
    eval_views,
    stream_key,
    train_views,
    uniforms,
    view_keys,
    views_identity,
)
from remem_ray.data.datasets import DataSplits, num_items
from remem_ray.data.store import ImageStore, is_in_memory, load_or_build, split_sources, store_bytes, store_side
from remem_ray.errors import UserInputError

if TYPE_CHECKING:
    from remem_ray.config import DataConfig

SPLITS = ("train", "val", "test")
_PICK_STREAM = 1  # stream of the view each image shows in an epoch (cached targets)


@dataclass(frozen=True)
class Views:
    """`count` fixed augmented views per training image, drawn from `seed` (cached teacher targets)."""

    count: int
    seed: int


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1


def epoch_seed(seed: int, epoch: int) -> int:
    return stream_key(seed, epoch)


def per_rank_batches(size: int, batch_size: int, shard: Shard) -> tuple[int, int, bool]:
    """(images per rank, batches per epoch, drop_last) for a training split."""
    per_rank = size // shard.world_size if shard.world_size > 1 else size
    drop_last = per_rank > batch_size
    return per_rank, (per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)), drop_last


class DataPipeline(ABC):
    """Training and eval batches of one run's splits, on one rank."""

    kind: str

    def __init__(self, splits: DataSplits, device: torch.device, seed: int, shard: Shard) -> None:
        self.splits, self.device, self.seed, self.shard = splits, device, seed, shard

    @abstractmethod
    def train(self, batch_size: int, views: Views | None = None):
        """Shuffled, augmented training batches; with views, items also carry (index, view)."""

    @abstractmethod
    def eval(self, split: str, batch_size: int):
        """Un-augmented batches of val or test, this rank's share."""

    @abstractmethod
    def view_batches(self, views: Views, batch_size: int, images: range | None = None) -> Iterator[torch.Tensor]:
        """Every view of every training image (of `images`, a share of them) once, image-major:
        the target cache's inputs."""

    def describe(self) -> str:
        return self.kind

    def identity(self) -> str:
        """What decides the pictures this pipeline draws (keys of caches built from its views)."""
        return f"{self.kind}|{views_identity(self.splits.augment)}"


# --------------------------------------------------------------------------- the DataLoader path


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
        return num_items(self.base)

    def view(self, index: int, view: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_view_seed(self.view_seed, index, view))  # CPU only: fast
            return self.base[index]

    def __getitem__(self, index: int):
        view = int(torch.randint(self.n_views, ()))
        image, label = self.view(index, view)
        return image, label, index, view


def _view_seed(view_seed: int, index: int, view: int) -> int:
    return (view_seed * 1_000_003 + index * 1_009 + view) % (2**63 - 1)


class _AllViews(Dataset):
    """Every (image, view) pair of a range of images once, for computing the cache."""

    def __init__(self, views: FixedViews, images: range) -> None:
        self.views, self.first = views, images.start
        self.pairs = len(images) * views.n_views

    def __len__(self) -> int:
        return self.pairs

    def __getitem__(self, flat: int):
        index, view = divmod(flat, self.views.n_views)
        return self.views.view(self.first + index, view)[0]


class EpochLoader:
    """A DataLoader whose shuffle order is a function of (seed, epoch), sharded by rank."""

    def __init__(
        self, ds: Dataset, batch_size: int, seed: int, num_workers: int, device: torch.device, shard: Shard
    ) -> None:
        self.seed, self.shard = seed, shard
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler: torch.utils.data.DistributedSampler | None = None
        if shard.world_size > 1:
            self.sampler = torch.utils.data.DistributedSampler(
                ds, num_replicas=shard.world_size, rank=shard.rank, shuffle=True, seed=seed, drop_last=True
            )
        _, _, drop_last = per_rank_batches(num_items(ds), batch_size, shard)
        # Workers start afresh each epoch: persistent ones would draw their seeds from the generator
        # once, in whichever epoch came first, so a resumed run would shuffle and augment otherwise.
        self.loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            generator=self.generator,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )

    def set_epoch(self, epoch: int) -> None:
        # worker processes seed their augmentation from this generator: one stream per rank, or
        # every rank's worker w would draw the same crops and flips for its own images
        if self.shard.world_size > 1:
            self.generator.manual_seed(stream_key(self.seed, epoch, self.shard.rank))
        else:
            self.generator.manual_seed(epoch_seed(self.seed, epoch))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return in_one_line(self.loader)


class WorkerErrors:
    """A DataLoader whose bad data (say an image that does not decode) raises its one line."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return in_one_line(self.loader)


def in_one_line(batches) -> Iterator:
    """A DataLoader worker's error comes back as its type with the worker's whole traceback for
    a message; bad input (a UserInputError: data.root's image that does not read) is raised again
    with its own words, the traceback's last line, as the CLI and the trial table show one line."""
    try:
        yield from batches
    except UserInputError as err:
        words = str(err).strip().splitlines()
        if len(words) < 2 or not words[0].startswith("Caught "):
            raise
        raise type(err)(words[-1].partition(f"{type(err).__name__}: ")[2] or words[-1]) from None


def loader_workers(configured: int | None, device: torch.device) -> int:
    """DataLoader worker processes: as configured, else a few on CUDA (keep the GPU fed), none on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, torch.cuda.device_count()) - 1))


class LoaderPipeline(DataPipeline):
    kind = "loader"

    def __init__(self, splits: DataSplits, device: torch.device, seed: int, shard: Shard, num_workers: int) -> None:
        super().__init__(splits, device, seed, shard)
        self.num_workers = num_workers

    def identity(self) -> str:
        """Its crops of decoded images are torchvision's (RandomResizedCrop, RandomCrop), drawn under
        the view's seed: its version, less the build's suffix (+cu130 and +cpu draw alike)."""
        import torchvision

        return f"{super().identity()}|torchvision-{torchvision.__version__.split('+')[0]}"

    def train(self, batch_size: int, views: Views | None = None) -> EpochLoader:
        ds = self.splits.train if views is None else FixedViews(self.splits.train, views.count, views.seed)
        return EpochLoader(ds, batch_size, self.seed, self.num_workers, self.device, self.shard)

    def eval(self, split: str, batch_size: int) -> WorkerErrors:
        ds = getattr(self.splits, split)
        if self.shard.world_size > 1:
            ds = Subset(ds, range(self.shard.rank, num_items(ds), self.shard.world_size))
        return self._in_order(ds, batch_size)

    def view_batches(self, views: Views, batch_size: int, images: range | None = None) -> Iterator[torch.Tensor]:
        fixed = FixedViews(self.splits.train, views.count, views.seed)
        yield from self._in_order(_AllViews(fixed, images if images is not None else range(len(fixed))), batch_size)

    def _in_order(self, ds: Dataset, batch_size: int) -> WorkerErrors:
        """Every item once, in order, from the worker processes (their bad data in one line)."""
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return WorkerErrors(loader)

    def describe(self) -> str:
        return f"loader ({self.num_workers} worker processes)"


# --------------------------------------------------------------------------- the device path


class _Gather:
    """Stored uint8 images by index, delivered on the device.

    Callers pass the indices both on the host and on the device (made once per epoch): a
    blocking host-to-device copy of indices per batch would wait for the queued steps to finish.
    """

    def __init__(self, store: ImageStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.on_device = store.images.device == device
        self.labels = store.labels.to(device)
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._turn = 0

    def __call__(self, index: torch.Tensor, device_index: torch.Tensor) -> torch.Tensor:
        if self.on_device:
            return self.store.images[device_index]
        if self.device.type != "cuda":
            return self.store.images[index]
        return self._through_pinned(index)

    def _through_pinned(self, index: torch.Tensor) -> torch.Tensor:
        """Two pinned buffers in turn; a buffer is refilled once its last copy has finished."""
        turn = self._turn % 2
        self._turn += 1
        if len(self._staging) <= turn or self._staging[turn][0].shape[0] < len(index):
            shape = (len(index), *self.store.images.shape[1:])
            self._staging[turn : turn + 1] = [(torch.empty(shape, dtype=torch.uint8).pin_memory(), None)]
        buf, copied = self._staging[turn]
        if copied is not None:
            copied.synchronize()
        staged = buf[: len(index)]
        torch.index_select(self.store.images, 0, index, out=staged)
        images = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the stream the copy went on
        self._staging[turn] = (buf, event)
        return images


class DeviceTrainBatches:
    """One epoch's shuffled, sharded, augmented batches from a store; order and views from (seed, epoch)."""

    def __init__(
        self, gather: _Gather, aug: TrainAugment, batch_size: int, seed: int, shard: Shard, views: Views | None
    ) -> None:
        self.gather, self.aug, self.batch_size, self.seed, self.shard, self.views = (
            gather,
            aug,
            batch_size,
            seed,
            shard,
            views,
        )
        self.per_rank, self.batches, _ = per_rank_batches(len(gather.store), batch_size, shard)
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def order(self) -> torch.Tensor:
        """This rank's image indices for the epoch (CPU)."""
        size = len(self.gather.store)
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        if self.shard.world_size > 1:
            perm = perm[: self.per_rank * self.shard.world_size][self.shard.rank :: self.shard.world_size]
        return perm

    def __iter__(self):
        order = self.order()
        device_order = order.to(self.gather.device)
        key = epoch_seed(self.seed, self.epoch)
        for b in range(self.batches):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = device_order[batch]
            images = self.gather(order[batch], index)
            labels = self.gather.labels[index]
            if self.views is None:
                keys = torch.full_like(index, key)
                yield train_views(images, keys, index, self.aug), labels
            else:
                pick = uniforms(torch.full_like(index, stream_key(self.seed, self.epoch, _PICK_STREAM)), index, 1)
                view = (pick[:, 0] * self.views.count).long().clamp_(max=self.views.count - 1)
                yield train_views(images, view_keys(self.views.seed, view), index, self.aug), labels, index, view


class DeviceEvalBatches:
    def __init__(self, gather: _Gather, view: EvalResize, batch_size: int, shard: Shard) -> None:
        self.gather, self.view, self.batch_size = gather, view, batch_size
        self.index = torch.arange(shard.rank, len(gather.store), shard.world_size)
        self.device_index = self.index.to(gather.device)

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = self.device_index[batch]
            yield eval_views(self.gather(self.index[batch], index), self.view), self.gather.labels[index]


class DevicePipeline(DataPipeline):
    kind = "device"

    def __init__(
        self,
        splits: DataSplits,
        stores: dict[str, ImageStore],
        device: torch.device,
        seed: int,
        shard: Shard,
        placement: str,
    ) -> None:
        super().__init__(splits, device, seed, shard)
        self.stores, self.placement = stores, placement
        self.gathers = {name: _Gather(store, device) for name, store in stores.items()}

    def train(self, batch_size: int, views: Views | None = None) -> DeviceTrainBatches:
        return DeviceTrainBatches(self.gathers["train"], self.splits.augment, batch_size, self.seed, self.shard, views)

    def eval(self, split: str, batch_size: int) -> DeviceEvalBatches:
        return DeviceEvalBatches(self.gathers[split], self.splits.eval_view, batch_size, self.shard)

    def view_batches(self, views: Views, batch_size: int, images: range | None = None) -> Iterator[torch.Tensor]:
        gather = self.gathers["train"]
        images = images if images is not None else range(len(gather.store))
        flat = torch.arange(images.start * views.count, images.stop * views.count)
        if not len(flat):  # split() would give one empty batch
            return
        device_flat = flat.to(self.device)
        for host, device in zip(flat.split(batch_size), device_flat.split(batch_size)):
            index, view = device // views.count, device % views.count
            yield train_views(
                gather(host // views.count, index), view_keys(views.seed, view), index, self.splits.augment
            )

    def identity(self) -> str:
        return f"device-{self.stores['train'].images.shape[-1]}|{views_identity(self.splits.augment)}"

    def describe(self) -> str:
        store = self.stores["train"]
        side = store.images.shape[-1]
        total = sum(s.nbytes for s in self.stores.values())
        where = f"on {self.device.type}" if self.placement == "device" else "in host memory (memory-mapped)"
        return f"device (uint8 {side}x{side} store, {total / 2**20:.1f} MiB {where})"


# --------------------------------------------------------------------------- choosing


def choose_pipeline(cfg: DataConfig, splits: DataSplits, device: torch.device) -> tuple[str, int | None]:
    """("device" or "loader", the store side) under data.pipeline and the memory budget."""
    if cfg.pipeline == "loader" or (cfg.pipeline == "auto" and device.type != "cuda"):
        return "loader", None
    side = store_side(splits.train, cfg)
    fits = store_bytes({s: len(getattr(splits, s)) for s in SPLITS}, side) <= cfg.store_budget_gb * 2**30
    if cfg.pipeline == "auto" and not fits:
        return "loader", None
    return "device", side


def device_store_bytes(cfg: DataConfig, splits: DataSplits, device: torch.device) -> int:
    """What build_pipeline would keep on `device` for these splits: the device pipeline's uint8
    store where it fits the budget, else nothing (the loader, or a store left on the host)."""
    kind, side = choose_pipeline(cfg, splits, device)
    if kind == "loader" or device.type != "cuda":
        return 0
    assert side is not None
    size = store_bytes({s: len(getattr(splits, s)) for s in SPLITS}, side)
    return size if size <= cfg.store_budget_gb * 2**30 else 0


def build_pipeline(
    cfg: DataConfig, splits: DataSplits, device: torch.device, seed: int, shard: Shard, log=print
) -> DataPipeline:
    _every_rank_evaluates(splits, shard)
    kind, side = choose_pipeline(cfg, splits, device)
    if kind == "loader":
        return LoaderPipeline(splits, device, seed, shard, loader_workers(cfg.num_workers, device))
    assert side is not None
    datasets = {s: getattr(splits, s) for s in SPLITS}
    sources = split_sources(datasets)
    stores = {s: load_or_build(datasets[s], cfg, seed, s, side, log=log, source=sources[s])[0] for s in SPLITS}
    fits = sum(s.nbytes for s in stores.values()) <= cfg.store_budget_gb * 2**30
    in_memory = is_in_memory(splits.train)
    if fits:
        stores = {
            name: store.to(device) if device.type == "cuda" or in_memory else _in_ram(store)
            for name, store in stores.items()
        }
    return DevicePipeline(splits, stores, device, seed, shard, "device" if fits else "host")


def _every_rank_evaluates(splits: DataSplits, shard: Shard) -> None:
    """Each rank evaluates a share of val and test: a rank with none makes no forward pass, while
    the others' first one broadcasts DDP's buffers (a BatchNorm's statistics) and waits for it
    (gloo: until its timeout; NCCL may pair the broadcast with the next all-reduce instead)."""
    for split in ("val", "test"):
        size = num_items(getattr(splits, split))
        if shard.world_size > 1 and size < shard.world_size:
            raise UserInputError(
                f"data: the {split} split holds {size} image(s), fewer than the run's {shard.world_size} workers, "
                f"each of which evaluates a share: give it more images, or run on fewer workers"
            )


def _in_ram(store: ImageStore) -> ImageStore:
    """A memory-mapped store read into memory (CPU runs within the budget)."""
    return ImageStore(store.images.clone(), store.labels)
