"""Dataset registry: each entry builds seeded train/val/test splits of [0, 1] image tensors.

Models normalise their own inputs (models.InputNormalizer), so a teacher and a student with
different mean/std can share one batch. Selection only ever looks at `val`; where a dataset
has no validation split it is carved from train, stratified and seeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from remem_ray.data.augment import EvalResize, TrainAugment, augment_for, eval_view_for
from remem_ray.errors import ResourceError, SpecError

if TYPE_CHECKING:
    from remem_ray.config import DataConfig


def num_items(ds: Dataset) -> int:
    """len() of a dataset: torch's Dataset type declares no __len__, every dataset here has one."""
    return len(ds)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DataSplits:
    """Seeded splits, and the views they show: the device pipeline rebuilds the same views in batches."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    augment: TrainAugment
    eval_view: EvalResize
    class_names: tuple[str, ...] | None = None  # by label index, where the dataset names its classes


def class_names_of(dataset: Dataset, num_classes: int) -> tuple[str, ...] | None:
    """A torchvision dataset's (or ImageFolder's) class names, one per label index, if it has them."""
    names = getattr(dataset, "classes", None)
    return tuple(str(n) for n in names) if names is not None and len(names) == num_classes else None


# (data config, seed, eval views at data.img_size, S3 endpoint and region for s3:// roots) -> splits;
# builders of four arguments (no region) are still called, without it
DatasetBuilder = Callable[["DataConfig", int, EvalResize, "str | None", "str | None"], DataSplits]
DATASETS: dict[str, DatasetBuilder] = {}


def _call_builder(
    builder: DatasetBuilder, cfg: DataConfig, seed: int, eval_view: EvalResize, endpoint: str | None, region: str | None
) -> DataSplits:
    """A builder registered before builders took the S3 region (four arguments) is called as it was."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "region" for p in params):
        return builder(cfg, seed, eval_view, endpoint, region)
    return builder(cfg, seed, eval_view, endpoint)  # type: ignore[call-arg]


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def wrap(builder: DatasetBuilder) -> DatasetBuilder:
        DATASETS[name] = builder
        return builder

    return wrap


def build_datasets(
    cfg: DataConfig,
    seed: int,
    eval_view: EvalResize | None = None,
    endpoint: str | None = None,
    region: str | None = None,
) -> DataSplits:
    """The data's splits; eval images as `eval_view` says (a model's timm crop, see
    EvalResize.from_timm) where training takes resized crops (augment.eval_view_for), else and
    by default a plain resize to data.img_size."""
    eval_view = eval_view or EvalResize(cfg.img_size)
    if eval_view.img_size != cfg.img_size:
        raise ValueError(f"eval views of {eval_view.img_size} px for data of {cfg.img_size} px")
    splits = _call_builder(DATASETS[cfg.name], cfg, seed, eval_view, endpoint, region)
    if cfg.max_train_samples is not None and num_items(splits.train) > cfg.max_train_samples:
        keep = _capped(dataset_targets(splits.train), cfg.max_train_samples, seed + 3)
        splits = dataclasses.replace(splits, train=torch.utils.data.Subset(splits.train, keep.tolist()))
    return splits


def refuse_cap_below_classes(size: int, classes: int) -> None:
    """data.max_train_samples under the class count: at the door where the count is known
    (spec_checks), else as the data is read."""
    if size < classes:
        raise SpecError(f"data.max_train_samples: {size} images cannot hold one of each of the {classes} classes")


def _capped(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` of the training images, stratified by class and seeded (data.max_train_samples).

    sklearn's split also needs room for each class in the images left out, and a class of two
    images: a cap just under the set's size (or a class of one image) was refused. There the
    cap is shared out by hand, each class its share of `size`, rounded by largest remainder."""
    classes, counts = np.unique(labels, return_counts=True)
    refuse_cap_below_classes(size, len(classes))
    try:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
        return keep
    except ValueError:  # the same draw as before wherever sklearn could make it (stored runs keep their images)
        pass
    exact = counts * size / len(labels)
    shares = np.maximum(np.floor(exact).astype(int), 1)  # one of each class at least
    while shares.sum() < size:  # the next image to the class furthest below its share, with one left
        shares[np.argmax(np.where(shares < counts, exact - shares, -np.inf))] += 1
    while shares.sum() > size:  # the floor of one overshot: take from the class furthest above
        shares[np.argmax(np.where(shares > 1, shares - exact, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, shares, strict=True)]
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- splitting


def _stratified_split(indices: np.ndarray, labels: np.ndarray, first_size: int | float, seed: int, field: str):
    """Split indices into (first, rest), stratified by label and seeded; a split the data is too
    small for (a part without room for one image of each class) is a one-line error on `field`."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(indices, train_size=first_size, stratify=labels, random_state=seed)
    except ValueError as exc:
        classes = len(np.unique(labels))
        raise SpecError(
            f"{field}: cannot split {len(indices)} images of {classes} classes by class: {exc}".splitlines()[0]
        ) from None


def train_val_test(labels: np.ndarray, cfg: DataConfig, seed: int, has_test: bool):
    """Indices of (train, val[, test]) carved from one labelled pool."""
    idx = np.arange(len(labels))
    test = np.array([], dtype=int)
    if not has_test:
        idx, test = _stratified_split(idx, labels, 1.0 - cfg.test_fraction, seed, "data.test_fraction")
    train, val = _stratified_split(idx, labels[idx], 1.0 - cfg.val_fraction, seed + 1, "data.val_fraction")
    return np.sort(train), np.sort(val), np.sort(test)


def dataset_targets(ds: Dataset) -> np.ndarray:
    """Integer labels of a dataset without decoding its images where the dataset allows."""
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_targets(ds.dataset)[np.asarray(ds.indices)]
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(num_items(ds))], dtype=np.int64)


# --------------------------------------------------------------------------- in-memory tensors


class TensorImages(Dataset):
    """Small images held in memory at native resolution, resized on access.

    Training views get a random translation (pad + crop, an augmentation fit for small
    images) and an optional flip; eval views are resized only.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, img_size: int, train: bool, hflip: bool = False
    ) -> None:
        self.images, self.labels = images, labels
        self.targets = labels.numpy()
        self.img_size, self.train, self.hflip = img_size, train, hflip
        self.augment = TrainAugment(img_size, "translate", hflip, pad=max(1, img_size // 8))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = F.interpolate(self.images[i : i + 1], size=self.img_size, mode="bilinear", align_corners=False)[0]
        if self.train:
            img = random_translate(img, self.augment.pad)
            if self.hflip and torch.rand(()) < 0.5:
                img = img.flip(-1)
        return img.clamp_(0.0, 1.0), int(self.labels[i])


def random_translate(img: torch.Tensor, pad: int) -> torch.Tensor:
    padded = F.pad(img, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]


def _tensor_splits(
    images: torch.Tensor,
    labels: np.ndarray,
    cfg: DataConfig,
    seed: int,
    num_classes: int,
    hflip: bool = False,
    class_names: tuple[str, ...] | None = None,
) -> DataSplits:
    train, val, test = train_val_test(labels, cfg, seed, has_test=False)
    lab = torch.as_tensor(labels)

    def part(idx: np.ndarray, is_train: bool) -> TensorImages:
        return TensorImages(images[idx], lab[idx], cfg.img_size, train=is_train, hflip=hflip)

    train_part = part(train, True)
    view = EvalResize(cfg.img_size)
    return DataSplits(
        train_part, part(val, False), part(test, False), num_classes, train_part.augment, view, class_names
    )


DIGITS_CLASSES = 10


@register_dataset("digits")
def _digits(
    cfg: DataConfig, seed: int, eval_view: EvalResize, endpoint: str | None = None, region: str | None = None
) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images): the embedded default, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    names = tuple(str(n) for n in bunch.target_names)
    return _tensor_splits(
        images, bunch.target.astype(np.int64), cfg, seed, num_classes=DIGITS_CLASSES, class_names=names
    )


@register_dataset("synthetic")
def _synthetic(
    cfg: DataConfig, seed: int, eval_view: EvalResize, endpoint: str | None = None, region: str | None = None
) -> DataSplits:
    """Class prototypes plus noise: learnable, tiny, generated from the seed (for tests)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(cfg.num_classes, 3, 8, 8, generator=g)
    labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
    noise = 0.25 * torch.randn(len(labels), 3, 8, 8, generator=g)
    images = (protos[torch.as_tensor(labels)] + noise).clamp(0.0, 1.0)
    return _tensor_splits(images, labels, cfg, seed, num_classes=cfg.num_classes)


# --------------------------------------------------------------------------- PIL datasets


def train_transform(aug: TrainAugment):
    from torchvision import transforms as T

    flip = [T.RandomHorizontalFlip()] if aug.hflip else []
    if aug.mode == "translate":
        return T.Compose(
            [
                T.Resize(aug.img_size),
                T.CenterCrop(aug.img_size),
                T.RandomCrop(aug.img_size, padding=aug.pad),
                *flip,
                T.ToTensor(),
            ]
        )
    return T.Compose([T.RandomResizedCrop(aug.img_size, scale=aug.scale, ratio=aug.ratio), *flip, T.ToTensor()])


def pil_eval_transform(view: EvalResize):
    """The loader path's eval views (the device path's: augment.eval_views)."""
    from torchvision import transforms as T

    interp = getattr(T.InterpolationMode, view.interpolation.upper(), T.InterpolationMode.BILINEAR)
    return T.Compose([T.Resize(view.resized_side, interpolation=interp), T.CenterCrop(view.img_size), T.ToTensor()])


class TransformedSubset(Dataset):
    """A view of a PIL dataset's items with its own transform (train and val share one base)."""

    def __init__(self, base: Dataset, indices: np.ndarray | None, transform, targets: np.ndarray) -> None:
        self.base = base
        self.indices = np.arange(len(targets)) if indices is None else indices
        self.transform = transform
        self.targets = targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[int(self.indices[i])]
        return self.transform(img.convert("RGB")), int(label)


def _pil_splits(
    train_base: Dataset,
    val_base: Dataset | None,
    test_base: Dataset | None,
    num_classes: int,
    cfg: DataConfig,
    seed: int,
    eval_view: EvalResize,
    hflip: bool,
) -> DataSplits:
    aug = augment_for(cfg.img_size, hflip)
    view = eval_view_for(aug, eval_view)
    tr_tf, ev_tf = train_transform(aug), pil_eval_transform(view)
    labels = dataset_targets(train_base)
    if test_base is None:
        train_idx, val_idx, test_idx = train_val_test(labels, cfg, seed, has_test=False)
        test = TransformedSubset(train_base, test_idx, ev_tf, labels)
    else:
        test = TransformedSubset(test_base, None, ev_tf, dataset_targets(test_base))
        if val_base is None:
            train_idx, val_idx, _ = train_val_test(labels, cfg, seed, has_test=True)
        else:
            train_idx, val_idx = None, None
    train = TransformedSubset(train_base, train_idx, tr_tf, labels)
    if val_base is not None and val_idx is None:
        val = TransformedSubset(val_base, None, ev_tf, dataset_targets(val_base))
    else:
        val = TransformedSubset(train_base, val_idx, ev_tf, labels)
    return DataSplits(train, val, test, num_classes, aug, view, class_names_of(train_base, num_classes))


@dataclass(frozen=True)
class TorchvisionEntry:
    cls_name: str
    splits: tuple[Any, Any, Any]  # constructor kwargs for (train, val, test); None = carve
    num_classes: int
    hflip: bool = True


_TORCHVISION: dict[str, TorchvisionEntry] = {
    "cifar10": TorchvisionEntry("CIFAR10", ({"train": True}, None, {"train": False}), 10),
    "cifar100": TorchvisionEntry("CIFAR100", ({"train": True}, None, {"train": False}), 100),
    "svhn": TorchvisionEntry("SVHN", ({"split": "train"}, None, {"split": "test"}), 10, hflip=False),
    "stl10": TorchvisionEntry("STL10", ({"split": "train"}, None, {"split": "test"}), 10),
    "flowers102": TorchvisionEntry("Flowers102", ({"split": "train"}, {"split": "val"}, {"split": "test"}), 102),
    "oxford_iiit_pet": TorchvisionEntry("OxfordIIITPet", ({"split": "trainval"}, None, {"split": "test"}), 37),
    "dtd": TorchvisionEntry("DTD", ({"split": "train"}, {"split": "val"}, {"split": "test"}), 47),
    "food101": TorchvisionEntry("Food101", ({"split": "train"}, None, {"split": "test"}), 101),
    "eurosat": TorchvisionEntry("EuroSAT", ({}, None, None), 10),
}


def _torchvision_builder(name: str, entry: TorchvisionEntry) -> DatasetBuilder:
    def build(
        cfg: DataConfig, seed: int, eval_view: EvalResize, endpoint: str | None = None, region: str | None = None
    ) -> DataSplits:
        import torchvision.datasets as tvd

        root = torchvision_root(cfg)
        cls = getattr(tvd, entry.cls_name)

        def make(kwargs):
            if kwargs is None:
                return None
            try:
                return cls(root=str(root), download=cfg.download, **kwargs)
            except (RuntimeError, FileNotFoundError, OSError) as exc:
                hint = "" if cfg.download else "; set data.download: true to fetch it"
                raise ResourceError(f"data.root: {name} not found under {root}{hint} ({exc})".splitlines()[0]) from None

        with contextlib.ExitStack() as once:
            if cfg.download:  # once per node at a time: every rank and trial downloaded and extracted in place at once
                from remem_ray.storage.cache import node_lock

                try:
                    root.mkdir(parents=True, exist_ok=True)
                    once.enter_context(
                        node_lock(root / f".remem-{name}.lock", f"checking or downloading {name} in {root}")
                    )
                except OSError:  # a read-only root: nothing can be downloaded there; torchvision checks what is
                    pass
            train, val, test = (make(k) for k in entry.splits)
        return _pil_splits(train, val, test, entry.num_classes, cfg, seed, eval_view, entry.hflip)

    build.__doc__ = f"torchvision {entry.cls_name} under data.root (download with data.download)."
    return build


for _name, _entry in _TORCHVISION.items():
    register_dataset(_name)(_torchvision_builder(_name, _entry))


def torchvision_root(cfg: DataConfig) -> Path:
    """Where a torchvision set lives: data.root, else the node's cache folder. Never the working
    folder: a sweep's driver and its Ray workers each run in another one, so `./data` found the
    set under `remem run` and missed it in every trial."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    from remem_ray.storage.cache import cache_root

    return cache_root() / "datasets"


def classes_without_reading(cfg: DataConfig) -> int | None:
    """The data's class count where its name says it (digits, synthetic, a torchvision set);
    None where only reading the data tells (imagefolder, a builder registered elsewhere)."""
    if cfg.name == "digits":
        return DIGITS_CLASSES
    if cfg.name == "synthetic":
        return cfg.num_classes
    entry = _TORCHVISION.get(cfg.name)
    return entry.num_classes if entry is not None else None


def missing_local_root(cfg: DataConfig) -> Path | None:
    """The data's local folder where it must exist before anything runs but does not: an
    imagefolder's root, a torchvision set's without data.download. s3:// roots are fetched,
    and checked, where they are used."""
    if cfg.name == "imagefolder":
        root = None if not cfg.root or cfg.root.startswith("s3://") else Path(cfg.root).expanduser()
    elif cfg.name in _TORCHVISION and not cfg.download:
        root = torchvision_root(cfg)
    else:
        return None
    return root if root is not None and not root.is_dir() else None


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit grayscale PNGs and TIFFs


def read_image(path: str):
    """An image folder's loader: the file as an RGB PIL image.

    PIL's own RGB conversion clips 16-bit grayscale to 255 (a picture almost all white): those
    are scaled to 8 bits first. Floating-point pixels (no range to scale from) and a file that
    does not decode are a one-line error naming the file (torchvision's loader raised PIL's
    error from deep inside a DataLoader worker)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ResourceError(f"data.root: cannot read image {path}: {exc}".splitlines()[0]) from None
    if img.mode == "F":
        raise ResourceError(f"data.root: {path} has floating-point pixels (mode F): save it as 8- or 16-bit")
    if img.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@register_dataset("imagefolder")
def _imagefolder(
    cfg: DataConfig, seed: int, eval_view: EvalResize, endpoint: str | None = None, region: str | None = None
) -> DataSplits:
    """class-per-folder images at a path or s3:// URI; train/ val/ test/ subfolders optional."""
    from torchvision.datasets import ImageFolder

    root = cfg.root or ""
    if root.startswith("s3://"):
        from remem_ray.storage import fetch_to_cache

        local = fetch_to_cache(root, endpoint=endpoint, field="data.root", region=region, identity=cfg.root_identity)
    else:
        local = Path(root).expanduser()
    if not local.is_dir():
        raise ResourceError(f"data.root: folder not found: {root}")
    parts = {p: local / p for p in ("train", "val", "test") if (local / p).is_dir()}
    try:
        train = ImageFolder(str(parts.get("train", local)), loader=read_image)
        val = ImageFolder(str(parts["val"]), loader=read_image) if "val" in parts else None
        test = ImageFolder(str(parts["test"]), loader=read_image) if "test" in parts else None
    except (FileNotFoundError, RuntimeError) as exc:
        raise ResourceError(f"data.root: no class folders of images in {root}: {exc}".splitlines()[0]) from None
    for other in (val, test):
        if other is not None and other.classes != train.classes:
            raise ResourceError(f"data.root: class folders differ between splits in {root}")
    if test is None and val is not None:
        # A val folder but no test folder: hold out test from train, keep the given val.
        labels = dataset_targets(train)
        idx, test_idx = _stratified_split(
            np.arange(len(labels)), labels, 1.0 - cfg.test_fraction, seed, "data.test_fraction"
        )
        aug = augment_for(cfg.img_size, True)
        view = eval_view_for(aug, eval_view)
        tr_tf, ev_tf = train_transform(aug), pil_eval_transform(view)
        return DataSplits(
            TransformedSubset(train, np.sort(idx), tr_tf, labels),
            TransformedSubset(val, None, ev_tf, dataset_targets(val)),
            TransformedSubset(train, np.sort(test_idx), ev_tf, labels),
            len(train.classes),
            aug,
            view,
            tuple(train.classes),
        )
    return _pil_splits(train, val, test, len(train.classes), cfg, seed, eval_view, hflip=True)
