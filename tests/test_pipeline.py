"""The device pipeline against the DataLoader path: same views in distribution, exact where promised."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from remem_ray.config import DataConfig
from remem_ray.data import (
    DataSplits,
    DevicePipeline,
    EvalResize,
    LoaderPipeline,
    Shard,
    TensorImages,
    Views,
    build_datasets,
    build_pipeline,
)
from remem_ray.data.augment import crop_resize, resized_crop_params, translate, uniforms
from remem_ray.data.pipeline import EpochLoader, choose_pipeline
from remem_ray.data.store import ImageStore, store_side

CPU = torch.device("cpu")


def _device(cfg: DataConfig, seed: int = 0, shard: Shard | None = None, **kw) -> DevicePipeline:
    cfg = cfg.model_copy(update={"pipeline": "device", **kw})
    pipe = build_pipeline(cfg, build_datasets(cfg, seed), CPU, seed, shard or Shard(), log=lambda m: None)
    assert isinstance(pipe, DevicePipeline)
    return pipe


def _epoch(batches, epoch: int) -> list:
    batches.set_epoch(epoch)
    return list(batches)


def _gradient(side: int) -> np.ndarray:
    """Channel 0 grows left to right, channel 1 top to bottom, channel 2 is 1: a view shows its own crop."""
    ramp = (np.arange(side) + 0.5) / side
    img = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.ones((side, side))])
    return img.astype(np.float32)


def _gradient_folder(root, side: int, per_class: int = 4):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = (_gradient(side).transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def _crop_stats(views: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(crop area fraction, flipped) per view of the gradient image, from the gradient's slope inside
    the view (edges differ in how each resampler treats them; the interior does not)."""
    x, y = views[:, 0], views[:, 1]
    size, inner = views.shape[-1], views.shape[-1] // 10
    span = size - 1 - 2 * inner
    width = (x[:, :, -1 - inner] - x[:, :, inner]).mean(1).abs() / span * size
    height = (y[:, -1 - inner, :] - y[:, inner, :]).mean(1).abs() / span * size
    flipped = x[:, :, -1].mean(1) < x[:, :, 0].mean(1)
    return (width * height).numpy(), flipped.numpy()


def test_batches_have_the_right_shape_range_labels_and_count():
    cfg = DataConfig(name="digits", img_size=16)
    pipe = _device(cfg)
    train, val = pipe.train(64), pipe.eval("val", 100)
    batches = _epoch(train, 1)
    assert len(batches) == len(train) == len(pipe.splits.train) // 64
    images, labels = batches[0]
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.max()) > 0.5
    evals = list(val)
    assert sum(len(b[1]) for b in evals) == len(pipe.splits.val)
    assert torch.equal(torch.cat([b[1] for b in evals]), torch.as_tensor(pipe.splits.val.targets))
    # eval views equal the loader path's up to uint8 rounding of the stored pixels
    loader_val = torch.stack([pipe.splits.val[i][0] for i in range(100)])
    torch.testing.assert_close(evals[0][0], loader_val, atol=2.5 / 255, rtol=0)


def _within_standard_errors(ours: torch.Tensor, expected, k: float = 4.0, theirs: torch.Tensor | None = None):
    """|mean(ours) - expected| (or - mean(theirs)) within k standard errors of that difference, computed
    from the samples: the tolerance shrinks with n, so a bias of a fraction of a pixel fails."""
    var = float(ours.var()) / len(ours)
    if theirs is not None:
        expected, var = float(theirs.mean()), var + float(theirs.var()) / len(theirs)
    tolerance = k * math.sqrt(var)
    assert 0.0 < tolerance < 0.25, tolerance  # too few samples would make the check blind again
    assert abs(float(ours.mean()) - expected) <= tolerance, (float(ours.mean()), expected, tolerance)


def test_translate_and_flip_statistics_match_the_loader_path():
    """Small images: shift (read from the zero border of a constant channel) and flip rate, both paths.

    Each mean shift is held to 4 standard errors of the sample (of 0, the mean of a uniform shift in
    -pad..pad, and of the other path): an off-by-one in the shift range moves the mean by 1/3 to 1/2
    pixel, 6 or more standard errors here, where a fixed 0.5 px tolerance let it pass."""
    n = 1200
    images = torch.as_tensor(_gradient(8)).expand(n, 3, 8, 8).contiguous()
    labels = torch.zeros(n, dtype=torch.long)
    train = TensorImages(images, labels, img_size=16, train=True, hflip=True)
    splits = DataSplits(train, train, train, 2, train.augment, EvalResize(16))
    store = ImageStore((images * 255).round().to(torch.uint8), labels)
    pipe = DevicePipeline(splits, {"train": store}, CPU, 0, Shard(), "device")
    device_views = torch.cat([b[0] for b in _epoch(pipe.train(100), 1)])
    torch.manual_seed(0)
    loader_views = torch.stack([train[i][0] for i in range(n)])
    assert len(device_views) == len(loader_views) == n

    def stats(views):
        filled = views[:, 2] > 0.5  # channel 2 is 1 inside the image, 0 in the padding
        rows, cols = filled.any(2).float(), filled.any(1).float()
        top, left = rows.argmax(1), cols.argmax(1)
        bottom, right = rows.flip(1).argmax(1), cols.flip(1).argmax(1)
        # flipped: channel 0 falls from the first filled column to the last (the border is 0 in every
        # channel, so the view's outer columns alone would mistake a shifted view for a flipped one)
        at = lambda col: views[torch.arange(len(views)), 0, :, col].mean(1)
        flipped = at(left) > at(views.shape[-1] - 1 - right)
        shift_y = (top - bottom).float()  # top gap minus bottom gap
        # the flip comes after the shift and mirrors it: undo it, else a biased dx averages out to 0
        shift_x = (left - right).float() * torch.where(flipped, -1.0, 1.0)
        return shift_x, shift_y, flipped.float()

    (dx, dy, flip), (lx, ly, lflip) = stats(device_views), stats(loader_views)
    pad = train.augment.pad
    assert int(dx.abs().max()) == int(lx.abs().max()) == pad  # shifts of -pad..pad pixels
    for ours, theirs in ((dx, lx), (dy, ly)):
        _within_standard_errors(ours, 0.0)
        _within_standard_errors(theirs, 0.0)
        _within_standard_errors(ours, None, theirs=theirs)
        assert float(ours.std()) == pytest.approx(float(theirs.std()), rel=0.15)
    _within_standard_errors(flip, 0.5)
    _within_standard_errors(lflip, 0.5)


def test_resized_crop_scale_and_flip_statistics_match_the_loader_path(tmp_path, monkeypatch):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    root = _gradient_folder(tmp_path / "imgs", side=64, per_class=150)
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=96, val_fraction=0.1, test_fraction=0.1)
    pipe = _device(cfg)
    assert pipe.splits.augment.mode == "resized_crop"
    assert pipe.stores["train"].images.shape[-1] == 64  # equal square images: kept at native size
    device_views = torch.cat([b[0] for b in _epoch(pipe.train(60), 1)])
    torch.manual_seed(0)
    loader_views = torch.stack([pipe.splits.train[i][0] for i in range(len(device_views))])
    (area, flip), (l_area, l_flip) = _crop_stats(device_views), _crop_stats(loader_views)
    lo, hi = pipe.splits.augment.scale
    assert lo - 0.05 <= area.min() and area.max() <= hi + 0.05
    assert area.mean() == pytest.approx(l_area.mean(), abs=0.03)
    assert np.quantile(area, [0.25, 0.5, 0.75]) == pytest.approx(np.quantile(l_area, [0.25, 0.5, 0.75]), abs=0.05)
    assert flip.mean() == pytest.approx(l_flip.mean(), abs=0.1) and flip.mean() == pytest.approx(0.5, abs=0.08)


def test_batched_ops_equal_their_per_image_definitions():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 12, 12)
    dy, dx = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([4, 0, 2, 1, 3])
    shifted = translate(images, dy, dx, pad=2)
    for i in range(5):
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        assert torch.equal(shifted[i], padded[:, dy[i] : dy[i] + 12, dx[i] : dx[i] + 12])
    # a whole-image box is a plain resize; flipping it is the mirror image
    u = torch.ones(5, 41)  # every attempt too large: the fallback, the whole (square) image
    boxes = resized_crop_params(u * 0.999, 12, 12, (2.0, 2.0), (3 / 4, 4 / 3), hflip=False)
    assert boxes.width.tolist() == [12] * 5 and boxes.top.tolist() == [0] * 5
    whole = crop_resize(images, boxes, 12)
    torch.testing.assert_close(whole, images, atol=1e-5, rtol=0)
    flipped = crop_resize(
        images, type(boxes)(boxes.top, boxes.left, boxes.height, boxes.width, torch.ones(5, dtype=torch.bool)), 12
    )
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)


def test_random_draws_are_uniform_and_a_pure_function_of_key_and_index():
    index = torch.arange(20000)
    u = uniforms(torch.full_like(index, 12345), index, 3)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert u.mean(0).tolist() == pytest.approx([0.5] * 3, abs=0.01)
    hist = torch.histc(u[:, 0], bins=10, min=0, max=1) / len(index)
    assert hist.tolist() == pytest.approx([0.1] * 10, abs=0.01)
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.03
    shuffled = index[torch.randperm(len(index))]
    assert torch.equal(uniforms(torch.full_like(index, 12345), shuffled, 3), u[shuffled])  # batch-independent
    assert not torch.equal(uniforms(torch.full_like(index, 12346), index, 3), u)


def test_same_seed_and_epoch_give_identical_batches_and_a_resumed_run_continues_the_sequence():
    cfg = DataConfig(name="digits", img_size=16)
    first, second = _device(cfg).train(50), _device(cfg).train(50)
    epochs = [_epoch(first, e) for e in (1, 2, 3)]
    for a, b in zip(epochs[0], _epoch(second, 1)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # each epoch its own order and views
    resumed = _device(cfg).train(50)  # a fresh process resuming at epoch 3
    for a, b in zip(epochs[2], _epoch(resumed, 3)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_seed = _device(cfg, seed=1).train(50)
    assert not torch.equal(_epoch(other_seed, 1)[0][0], epochs[0][0][0])


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_path_order_and_views_are_a_function_of_the_epoch_too(workers):
    """With worker processes too: they must not draw their seeds once, in whichever epoch came first."""
    cfg = DataConfig(name="digits", img_size=16, pipeline="loader")
    splits = build_datasets(cfg, 0)
    a = LoaderPipeline(splits, CPU, 0, Shard(), workers).train(200)
    b = LoaderPipeline(splits, CPU, 0, Shard(), workers).train(200)
    _epoch(a, 1)
    torch.manual_seed(5)  # in-process augmentation draws from the global RNG (the loop reseeds it per epoch)
    epoch_a = _epoch(a, 2)
    torch.manual_seed(5)
    epoch_b = _epoch(b, 2)  # straight to epoch 2, as a resumed run does
    for x, y in zip(epoch_a, epoch_b):
        assert torch.equal(x[1], y[1]) and torch.equal(x[0], y[0])


class _Draws(torch.utils.data.Dataset):
    """Each item one draw of the torch RNG, as an augmentation makes in a loader worker."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)


def _draws(shard: Shard, epoch: int) -> torch.Tensor:
    loader = EpochLoader(_Draws(), 8, 0, 1, CPU, shard)
    loader.set_epoch(epoch)
    return torch.cat(list(loader))


def test_loader_workers_of_different_ranks_augment_with_their_own_streams():
    """DDP through the loader path: each rank's worker draws its own crops and flips. Before, the
    workers' seeds came from a generator seeded by (seed, epoch) alone, so worker w of every rank
    drew the same stream, and each augmentation came world_size times in a global batch."""
    ranks = [_draws(Shard(rank, 2), 3) for rank in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])
    assert torch.equal(_draws(Shard(1, 2), 3), ranks[1])  # still a function of (seed, epoch, rank)
    assert not torch.equal(_draws(Shard(1, 2), 4), ranks[1])


def test_cached_target_views_equal_the_views_training_sees_exactly():
    cfg = DataConfig(name="digits", img_size=16)
    pipe = _device(cfg)
    views = Views(count=3, seed=7)
    n = len(pipe.splits.train)
    table = torch.cat(list(pipe.view_batches(views, batch_size=97))).view(n, 3, 3, 16, 16)
    seen = 0
    for epoch in (1, 2):
        for images, _labels, index, view in _epoch(pipe.train(64, views=views), epoch):
            assert torch.equal(images, table[index, view])  # bit for bit, fp32
            assert view.min() >= 0 and view.max() < 3
            seen += len(index)
    assert seen == 2 * len(pipe.train(64)) * 64
    assert not torch.equal(table[:, 0], table[:, 1])
    other = torch.cat(list(_device(cfg).view_batches(Views(3, 8), 256))).view(n, 3, 3, 16, 16)
    assert not torch.equal(other, table)


@pytest.mark.parametrize("kind", ["device", "loader"])
def test_the_views_of_a_share_of_the_images_are_that_share_of_all_views(kind):
    """A DDP run's ranks compute the target cache each for a share of the images."""
    cfg = DataConfig(name="digits", img_size=16, max_train_samples=40)
    splits = build_datasets(cfg, 0)
    pipe = _device(cfg) if kind == "device" else LoaderPipeline(splits, CPU, 0, Shard(), 0)
    views = Views(count=3, seed=7)
    n = len(pipe.splits.train)
    every = torch.cat(list(pipe.view_batches(views, batch_size=16))).view(n, 3, 3, 16, 16)
    share = torch.cat(list(pipe.view_batches(views, 16, range(13, 27)))).view(14, 3, 3, 16, 16)
    assert torch.equal(share, every[13:27])
    assert list(pipe.view_batches(views, 16, range(5, 5))) == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_equal_shards_and_eval_stays_exact(world_size):
    cfg = DataConfig(name="digits", img_size=16)
    shards = [_device(cfg, shard=Shard(r, world_size)) for r in range(world_size)]
    orders = [p.train(32) for p in shards]
    for o in orders:
        o.set_epoch(4)
    indices = [o.order() for o in orders]
    assert len({len(i) for i in indices}) == 1 and len({len(o) for o in orders}) == 1
    flat = torch.cat(indices)
    assert len(flat.unique()) == len(flat) == (len(shards[0].splits.train) // world_size) * world_size
    labels = torch.cat([b[1] for p in shards for b in p.eval("test", 50)])
    assert len(labels) == len(shards[0].splits.test)
    assert torch.equal(labels.sort().values, torch.as_tensor(shards[0].splits.test.targets).sort().values)


def test_store_is_cached_per_node_and_resizes_mixed_images(tmp_path, monkeypatch):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "mixed"
    for c, size in (("a", (40, 30)), ("b", (50, 70))):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", size, (i * 40, 90, 200)).save(root / c / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=32, pipeline="device")
    splits = build_datasets(cfg, 0)
    assert store_side(splits.train, cfg) == math.ceil(32 / 0.875)
    logs: list[str] = []
    first = build_pipeline(cfg, splits, CPU, 0, Shard(), log=logs.append)
    assert sum("decoding" in m for m in logs) == 3  # train, val, test
    logs.clear()
    again = build_pipeline(cfg, splits, CPU, 0, Shard(), log=logs.append)
    assert not logs and torch.equal(again.stores["train"].images, first.stores["train"].images)
    assert len(list((tmp_path / "cache" / "stores").glob("*/.complete"))) == 3
    # over the budget: the store stays memory-mapped, batches are the same
    mapped = build_pipeline(cfg.model_copy(update={"store_budget_gb": 0.0}), splits, CPU, 0, Shard(), log=print)
    assert mapped.placement == "host" and first.placement == "device"
    for a, b in zip(_epoch(first.train(4), 2), _epoch(mapped.train(4), 2)):
        assert torch.equal(a[0], b[0])
    assert "memory-mapped" in mapped.describe()


def test_equal_square_images_larger_than_the_default_side_are_stored_smaller(tmp_path, monkeypatch):
    """The device crops do not antialias: a store never holds images much larger than needed."""
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    root = _gradient_folder(tmp_path / "imgs", side=64, per_class=10)
    small = DataConfig(name="imagefolder", root=str(root), img_size=32)
    assert store_side(build_datasets(small, 0).train, small) == math.ceil(32 / 0.875)  # 37 < 64
    large = small.model_copy(update={"img_size": 96})
    assert store_side(build_datasets(large, 0).train, large) == 64  # native: 64 <= 110


def test_auto_takes_the_device_pipeline_on_cuda_when_the_store_fits():
    cfg = DataConfig(name="digits", img_size=16)
    splits = build_datasets(cfg, 0)
    cuda = torch.device("cuda")  # only its type is looked at
    assert choose_pipeline(cfg, splits, CPU) == ("loader", None)
    assert choose_pipeline(cfg, splits, cuda) == ("device", 8)
    assert choose_pipeline(cfg.model_copy(update={"store_budget_gb": 1e-6}), splits, cuda) == ("loader", None)
    assert choose_pipeline(cfg.model_copy(update={"pipeline": "device"}), splits, CPU) == ("device", 8)
    assert choose_pipeline(cfg.model_copy(update={"pipeline": "loader"}), splits, cuda) == ("loader", None)


@pytest.mark.parametrize(
    "img_size, crop_pct", [(224, 0.9), (224, 0.875), (224, 0.95), (384, 1.0), (16, 0.875), (32, 0.96), (288, 0.95)]
)
def test_eval_resize_matches_timms_own_eval_transform(img_size, crop_pct):
    """Eval images are resized as timm resizes them (it floors img_size / crop_pct), then centre-
    cropped as its CenterCrop crops: an odd margin (224 at 0.95: 235 - 224) puts the extra pixel
    above and left. The device path floored it and evaluated other pixels than the loader path."""
    from timm.data.transforms_factory import transforms_imagenet_eval
    from torchvision import transforms as T

    from remem_ray.data.augment import eval_views, to_unit

    timm_eval = transforms_imagenet_eval(img_size=img_size, crop_pct=crop_pct)
    (resize,) = [t for t in timm_eval.transforms if isinstance(t, T.Resize)]
    (crop,) = [t for t in timm_eval.transforms if isinstance(t, T.CenterCrop)]
    view = EvalResize(img_size, crop_pct)
    assert view.resized_side == resize.size
    side = view.resized_side  # an image of that side already: the crop alone is compared
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(eval_views(images, view), crop(to_unit(images)))


def test_the_stored_side_looks_past_the_first_class(tmp_path, monkeypatch):
    """Items are sorted by class: a first class of small squares decided the side of all of them
    (the others' 160 x 120 images shrunk to 32 px, then blown up to 64 by the device crops)."""
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    for cls, (w, h) in (("a", (32, 32)), ("b", (160, 120))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(60):  # more than the 32 images looked at in the first class's share of train
            Image.fromarray(np.full((h, w, 3), i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "imgs"), img_size=64)
    assert store_side(build_datasets(cfg, 0).train, cfg) == math.ceil(64 / 0.875)


def test_a_ddp_run_whose_eval_split_leaves_a_rank_without_images_is_refused():
    """A rank with no val image makes no forward pass while the others' first one broadcasts
    DDP's buffers (BatchNorm statistics) and waits for it: the run hung until gloo's timeout."""
    from remem_ray.errors import UserInputError

    splits = build_datasets(DataConfig(name="synthetic", num_classes=2, samples_per_class=6), 0)
    sizes = {split: len(getattr(splits, split)) for split in ("val", "test")}
    assert min(sizes.values()) == 2
    build_pipeline(DataConfig(), splits, CPU, 0, Shard(rank=0, world_size=2), log=lambda m: None)  # one image each
    with pytest.raises(
        UserInputError, match=r"^data: the val split holds 2 image\(s\), fewer than the run's 3 workers"
    ):
        build_pipeline(DataConfig(), splits, CPU, 0, Shard(rank=0, world_size=3), log=lambda m: None)
