import numpy as np
import pytest
import torch
from PIL import Image

from remem_ray.config import DataConfig
from remem_ray.data import DATASETS, build_datasets, dataset_targets
from remem_ray.errors import ResourceError

TORCHVISION = ["cifar10", "cifar100", "flowers102", "oxford_iiit_pet", "dtd", "food101", "eurosat", "svhn", "stl10"]


def _labels(ds):
    return dataset_targets(ds)


def test_registry_has_the_promised_datasets():
    assert {"digits", "synthetic", "imagefolder", *TORCHVISION} <= set(DATASETS)


def test_digits_split_is_stratified_disjoint_seeded_and_never_mixes_test():
    cfg = DataConfig(name="digits", img_size=16)
    a, b, c = build_datasets(cfg, 0), build_datasets(cfg, 0), build_datasets(cfg, 1)
    sizes = [len(a.train), len(a.val), len(a.test)]
    assert sum(sizes) == 1797 and a.num_classes == 10
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=2)
    for split in ("train", "val", "test"):
        counts = np.bincount(_labels(getattr(a, split)), minlength=10)
        assert counts.min() >= 0.8 * counts.max()  # stratified
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare counts)
    flat = lambda ds: {ds.images[i].numpy().tobytes() for i in range(len(ds))}  # noqa: E731
    assert len(flat(a.test) & flat(a.train)) <= 5
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, c.test.images)
    img, label = a.train[0]
    assert img.shape == (3, 16, 16) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert isinstance(label, int)


def test_train_views_are_augmented_eval_views_are_not():
    splits = build_datasets(DataConfig(name="digits", img_size=32), 0)
    torch.manual_seed(0)
    views = [splits.train[0][0] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_synthetic_is_learnable_shape_and_seeded():
    cfg = DataConfig(name="synthetic", num_classes=3, samples_per_class=20, img_size=8)
    s = build_datasets(cfg, 5)
    assert s.num_classes == 3 and len(s.train) + len(s.val) + len(s.test) == 60


def test_max_train_samples_caps_train_only():
    s = build_datasets(DataConfig(name="digits", max_train_samples=100), 0)
    assert len(s.train) == 100 and len(s.val) > 100
    assert set(np.unique(_labels(s.train))) == set(range(10))


def _write_imagefolder(root, splits=("train",), classes=("cat", "dog"), per_class=12):
    rng = np.random.default_rng(0)
    for split in splits:
        for ci, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (rng.random((20, 24, 3)) * 80 + ci * 150).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")


def test_imagefolder_single_folder_carves_val_and_test(tmp_path):
    _write_imagefolder(tmp_path / "ds", splits=("",), per_class=20)
    s = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=16), 0)
    assert s.num_classes == 2 and len(s.train) + len(s.val) + len(s.test) == 40
    assert s.class_names == ("cat", "dog")  # by label index: what an exported student's outputs mean
    img, label = s.val[0]
    assert img.shape == (3, 16, 16) and label in (0, 1)


def test_imagefolder_with_splits_uses_them(tmp_path):
    _write_imagefolder(tmp_path / "ds", splits=("train", "test"), per_class=12)
    s = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=16), 0)
    assert len(s.test) == 24 and len(s.train) + len(s.val) == 24
    assert s.class_names == ("cat", "dog")
    digits = build_datasets(DataConfig(name="digits"), 0)
    assert digits.class_names == tuple(str(d) for d in range(10))
    assert build_datasets(DataConfig(name="synthetic", num_classes=3), 0).class_names is None  # nameless


def test_imagefolder_from_s3_fetched_into_cache(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    _write_imagefolder(tmp_path / "ds", splits=("train", "val", "test"), per_class=6)
    for f in (tmp_path / "ds").rglob("*.png"):
        s3["client"].upload_file(str(f), s3["bucket"], f"data/ds/{f.relative_to(tmp_path / 'ds').as_posix()}")
    cfg = DataConfig(name="imagefolder", root=f"s3://{s3['bucket']}/data/ds", img_size=16)
    s = build_datasets(cfg, 0)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 12, 12) and s.class_names == ("cat", "dog")
    assert s.train[0][0].shape == (3, 16, 16)


def test_missing_imagefolder_and_torchvision_roots_are_clear(tmp_path):
    with pytest.raises(ResourceError, match=r"^data\.root: folder not found"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "none")), 0)
    with pytest.raises(ResourceError, match=r"^data\.root: cifar10 not found under .*data\.download"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path / "none")), 0)


def test_a_torchvision_download_runs_once_at_a_time_on_a_node(tmp_path, monkeypatch):
    """data.download: every rank and trial of a node called torchvision's download at once, each
    writing and extracting the same archive in place. Failed before: the two calls overlapped."""
    import threading
    import time

    import torchvision.datasets as tvd

    inside, overlapped = [0], []

    class Downloading:
        def __init__(self, root, download, **kwargs):
            inside[0] += 1
            overlapped.append(inside[0] > 1)
            time.sleep(0.3)  # the download
            inside[0] -= 1
            raise RuntimeError("stop after the download")

    monkeypatch.setattr(tvd, "CIFAR10", Downloading)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "data"), download=True)
    errors = []

    def build():
        try:
            build_datasets(cfg, 0)
        except ResourceError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 2 and overlapped and not any(overlapped)


def test_a_dataset_builder_of_four_arguments_still_builds():
    """Builders took (cfg, seed, eval_view, endpoint) before the S3 region joined them: one
    registered that way by a user must not fail in every Train worker."""
    from remem_ray.data import datasets as ds
    from remem_ray.data import register_dataset

    seen = []

    @register_dataset("mine")
    def mine(cfg, seed, eval_view, endpoint=None):
        seen.append(endpoint)
        return ds.DATASETS["digits"](cfg, seed, eval_view, endpoint, None)

    try:
        splits = build_datasets(DataConfig(name="mine"), 0, endpoint="http://e", region="eu-west-1")
    finally:
        ds.DATASETS.pop("mine")
    assert seen == ["http://e"] and splits.num_classes == 10


def test_a_download_into_a_root_that_takes_no_lock_file_goes_on_unlocked(tmp_path, monkeypatch):
    """A read-only data.root holding the whole dataset worked with download: true (torchvision
    checks it and downloads nothing); the lock file it cannot create must not break that."""
    import torchvision.datasets as tvd

    root = tmp_path / "data"
    (root / ".remem-cifar10.lock").mkdir(parents=True)  # opening it fails as a read-only root does
    built = []

    class Present:
        def __init__(self, root, download, **kwargs):
            built.append(kwargs)
            raise RuntimeError("stop here")

    monkeypatch.setattr(tvd, "CIFAR10", Present)
    with pytest.raises(ResourceError, match="^data.root: cifar10 not found under"):
        build_datasets(DataConfig(name="cifar10", root=str(root), download=True), 0)
    assert built == [{"train": True}]


@pytest.mark.parametrize("splits", [("",), ("train", "val")])  # the two folder layouts' code paths
def test_small_images_are_evaluated_whole_as_trained_large_ones_with_the_models_crop(tmp_path, splits):
    """Images of <= 64 px train on translations of the whole image: a model's timm crop (resnet10t:
    0.875) at eval showed a 32-px CIFAR image resized to 36 and cropped, its objects 1.125x
    larger than in any training view (digits and synthetic data were always evaluated whole)."""
    from torchvision.transforms.functional import to_tensor

    from remem_ray.data import EvalResize

    rng = np.random.default_rng(1)
    for split in splits:
        for cls in ("cat", "dog"):
            folder = tmp_path / "ds" / split / cls
            folder.mkdir(parents=True)
            for i in range(10):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    model_view = EvalResize(32, 0.875, "bicubic")
    small = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=32), 0, model_view)
    assert small.augment.mode == "translate" and small.eval_view == EvalResize(32, 1.0, "bicubic")
    image, _ = small.val[0]
    source = small.val.base.samples[int(small.val.indices[0])][0]
    assert torch.equal(image, to_tensor(Image.open(source).convert("RGB")))  # the whole image, unchanged

    large_view = EvalResize(72, 0.875, "bicubic")
    large = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=72), 0, large_view)
    assert large.augment.mode == "resized_crop" and large.eval_view == large_view


def test_a_cap_just_under_the_training_set_or_over_a_class_of_one_image_is_kept():
    """sklearn's stratified split wants room for every class in the images left out, and two
    images of each class: a cap of 1220 of digits' 1221 training images was refused."""
    full = len(build_datasets(DataConfig(name="digits"), 0).train)
    capped = build_datasets(DataConfig(name="digits", max_train_samples=full - 1), 0)
    assert len(capped.train) == full - 1 and set(np.unique(_labels(capped.train))) == set(range(10))
    # a cap sklearn can split draws what it always drew (stored runs keep their images)
    again = build_datasets(DataConfig(name="digits", max_train_samples=100), 0)
    assert again.train.indices == build_datasets(DataConfig(name="digits", max_train_samples=100), 0).train.indices
    from remem_ray.data.datasets import _capped

    labels = np.array([0] * 50 + [1] + [2] * 49)  # a class of one image
    keep = _capped(labels, 60, 0)
    assert len(keep) == len(set(keep.tolist())) == 60
    assert np.bincount(labels[keep]).tolist() == [30, 1, 29]


def _image_file(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path) if mode else Image.fromarray(pixels).save(path)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """PIL's RGB conversion of a 16-bit grayscale PNG clips: 99 % of a 0-40000 gradient read 255."""
    gradient = np.linspace(0, 40000, 24 * 24).reshape(24, 24).astype(np.uint16)
    for cls in ("a", "b"):
        for i in range(10):
            _image_file(tmp_path / "ds" / cls / f"{i}.png", gradient)
    assert Image.open(tmp_path / "ds" / "a" / "0.png").mode.startswith("I")  # 16 bits on disk
    s = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=24), 0)
    image = s.val[0][0]
    assert float(image.max()) == pytest.approx(40000 / 65535, abs=0.01)
    assert float(image.mean()) == pytest.approx(20000 / 65535, abs=0.02)


def test_an_image_that_does_not_decode_is_one_line_naming_it(tmp_path):
    from remem_ray.data import Shard, build_pipeline
    from remem_ray.data.store import load_or_build

    for cls in ("a", "b"):
        for i in range(8):
            _image_file(tmp_path / "ds" / cls / f"{i}.png", np.full((12, 12, 3), 30 * i, np.uint8))
    (tmp_path / "ds" / "b" / "7.png").write_bytes(b"not a png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "ds"), img_size=12)
    s = build_datasets(cfg, 0)
    split = next(name for name in ("train", "val", "test") if "b/7.png" in str(_paths(getattr(s, name))))
    with pytest.raises(ResourceError, match=r"^data\.root: cannot read image .*b/7\.png: cannot identify") as err:
        load_or_build(getattr(s, split), cfg, 0, split, 12, log=lambda m: None)  # the device pipeline's store
    assert "\n" not in str(err.value)
    # the loader pipeline: read in a DataLoader worker, whose error came back with its whole traceback
    loader = build_pipeline(
        cfg.model_copy(update={"pipeline": "loader", "num_workers": 1}), s, torch.device("cpu"), 0, Shard()
    )
    batches = loader.train(1) if split == "train" else loader.eval(split, 4)  # batches of 1: none dropped
    with pytest.raises(ResourceError, match=r"^data\.root: cannot read image .*b/7\.png") as err:
        list(batches)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def _paths(ds) -> list[str]:
    return [ds.base.samples[i][0] for i in ds.indices]
