"""Keys that name what was made: the teacher key names the training, the image store's key the files."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from remem_ray.config import DataConfig, RunSpec, load_run_spec
from remem_ray.data import DevicePipeline, Shard, build_datasets, build_pipeline, dataset_targets
from remem_ray.data.store import source_identity

CPU = torch.device("cpu")
SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

# --------------------------------------------------------------------------- the image store


def _folder(root, shade: int, per_class: int = 6):
    for ci, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), (shade, ci * 120, i * 30)).save(root / cls / f"{i}.png")
    return root


def _device_pipeline(cfg: DataConfig) -> DevicePipeline:
    pipe = build_pipeline(cfg, build_datasets(cfg, 0), CPU, 0, Shard(), log=lambda m: None)
    assert isinstance(pipe, DevicePipeline)
    return pipe


@pytest.fixture
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "stores"


def test_one_relative_root_in_two_working_folders_is_two_stores(tmp_path, store_cache, monkeypatch):
    """A config whose root is still relative (not read through a spec) names a folder per working folder."""
    stores = []
    for where, shade in (("one", 40), ("two", 200)):
        _folder(tmp_path / where / "imgs", shade)
        monkeypatch.chdir(tmp_path / where)
        cfg = DataConfig(name="imagefolder", root="imgs", img_size=12, pipeline="device").model_copy(
            update={"root": "imgs"}
        )
        stores.append(_device_pipeline(cfg).stores["train"])
    assert stores[0].images[:, 0].float().mean() < 100 < stores[1].images[:, 0].float().mean()
    assert len(list(store_cache.glob("*/.complete"))) == 6


def test_a_relabelled_folder_gets_a_new_store_with_its_new_labels(tmp_path, store_cache):
    root = _folder(tmp_path / "imgs", shade=90)
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=12, pipeline="device")
    before = _device_pipeline(cfg)
    os.replace(root / "a" / "0.png", root / "b" / "moved.png")  # same image count, one label changed
    splits = build_datasets(cfg, 0)
    after = build_pipeline(cfg, splits, CPU, 0, Shard(), log=lambda m: None)
    assert isinstance(after, DevicePipeline)
    for split in ("train", "val", "test"):
        expected = torch.as_tensor(dataset_targets(getattr(splits, split)))
        assert torch.equal(after.stores[split].labels, expected), split  # what the loader path reads
    assert not torch.equal(after.stores["train"].images, before.stores["train"].images)


def test_a_torchvision_dataset_is_fingerprinted_by_its_own_folder_only(tmp_path):
    """Other things under a shared root (other datasets, a results folder) never change its stores."""

    class Cifar:  # torchvision's convention: the dataset's files live in root/base_folder
        root, base_folder = str(tmp_path), "cifar-10-batches-py"

    (tmp_path / Cifar.base_folder).mkdir()
    (tmp_path / Cifar.base_folder / "data_batch_1").write_bytes(b"1")
    before = source_identity(Cifar())
    (tmp_path / "remem-results").mkdir()
    (tmp_path / "remem-results" / "trial.json").write_text("{}")
    assert source_identity(Cifar()) == before
    (tmp_path / Cifar.base_folder / "data_batch_1").write_bytes(b"22")
    assert source_identity(Cifar()) != before


# --------------------------------------------------------------------------- the teacher key

BASE = {"teacher.epochs": 4, "teacher.checkpoint_epochs": [2, 4]}
STUDENT_BASE = BASE


# one training, several spellings: each group must give one key
SAME_TRAINING = [
    [{}, {"teacher.checkpoint_epochs": [4, 2]}, {"teacher.checkpoint_epochs": [2, 4, 4, 2]}],
    [{"teacher.checkpoint_epochs": None}, {"teacher.checkpoint_epochs": [4]}, {"teacher.checkpoint_epochs": [4, 4]}],
    [{"teacher.alpha": 1.0}, {"teacher.alpha": 1, "teacher.reweight_mode": "mlp"}],
    [
        {"teacher.rho": 0.0},
        {"teacher.rho": 0, "teacher.adaptive": True},
        {"teacher.rho": 0.0, "teacher.adaptive": True, "teacher.asam_eta": 0.5},
    ],
    [{}, {"teacher.asam_eta": 0.3}],  # asam_eta is ASAM's alone
    [{"data.pipeline": "loader"}, {"data.pipeline": "loader", "data.store_size": 64}],  # no store is built
    [{}, {"teacher.weights": "none"}, {"teacher.weights": None}],
    [{"teacher.grad_clip": 1}, {"teacher.grad_clip": 1.0}],
    [{}, {"teacher.schedule.warmup_epochs": 1}, {"teacher.optimizer.lr": 2e-3, "teacher.optimizer.weight_decay": 0.05}],
    [{"teacher.model_kwargs": {"depth": 2, "embed_dim": 32}}, {"teacher.model_kwargs": {"embed_dim": 32, "depth": 2}}],
    [{}, {"data.num_workers": 2, "data.download": True, "data.store_budget_gb": 1.0}, {"student.epochs": 3}],
]


@pytest.mark.parametrize("spellings", SAME_TRAINING, ids=lambda group: str(group[-1]))
def test_spellings_of_one_teacher_training_share_its_key(spellings):
    keys = {load_run_spec(None, {**BASE, **spelling}).teacher_key() for spelling in spellings}
    assert len(keys) == 1, spellings


# each changes what the teacher learns (or which checkpoints it leaves): each must change the key
OTHER_TRAININGS = [
    {"seed": 1},
    {"data.name": "synthetic"},
    {"data.img_size": 24},
    {"data.val_fraction": 0.2},
    {"data.test_fraction": 0.25},
    {"data.max_train_samples": 100},
    {"data.pipeline": "device"},
    {"data.pipeline": "device", "data.store_size": 64},
    {"data.name": "synthetic", "data.num_classes": 4},
    {"data.name": "synthetic", "data.samples_per_class": 20},
    {"teacher.model": "vit_tiny_patch16_224"},
    {"teacher.model_kwargs": {"depth": 2}},
    {"teacher.weights": "timm"},
    {"teacher.alpha": 0.8},
    {"teacher.reweight_mode": "mlp"},
    {"teacher.rho": 0.1},
    {"teacher.rho": 0.0},
    {"teacher.adaptive": True},
    {"teacher.adaptive": True, "teacher.asam_eta": 0.3},
    {"teacher.optimizer.name": "lamb"},
    {"teacher.optimizer.lr": 1e-3},
    {"teacher.optimizer.weight_decay": 0.01},
    {"teacher.optimizer.name": "momentum", "teacher.optimizer.momentum": 0.8},  # adamw reads no momentum
    {"teacher.schedule.warmup_epochs": 0.5},
    {"teacher.schedule.min_lr_ratio": 0.1},
    {"teacher.epochs": 5},
    {"teacher.checkpoint_epochs": [4]},
    {"teacher.checkpoint_epochs": [1, 2, 4]},
    {"teacher.batch_size": 16},
    {"teacher.grad_clip": 1.0},
]


def test_what_changes_the_teacher_training_changes_its_key():
    keys = [load_run_spec(None, {**BASE, **change}).teacher_key() for change in OTHER_TRAININGS]
    base = load_run_spec(None, BASE)
    keys += [base.teacher_key(), base.teacher_key(world_size=2)]
    assert len(set(keys)) == len(keys), [c for c, k in zip(OTHER_TRAININGS, keys) if keys.count(k) > 1]


def test_canonical_spellings_keep_the_keys_stored_teachers_have():
    """Keys earlier versions gave the repository's specs (sorted checkpoint lists): their teacher
    folders stay where the registry looks."""
    expected = {
        "cifar100_vit_b.yaml": ("86fba36ebe1cd323", "50d7cd2aa468b66e"),
        "default.yaml": ("0ef9b25417047ab6", "bc933a05f908446b"),
        "smoke.yaml": ("a84cb951f6cbe76b", "09cc97579c640ff6"),
    }
    for name, (one, two) in expected.items():
        spec = load_run_spec(SEARCH_SPACES / name)
        assert (spec.teacher_key(), spec.teacher_key(2)) == (one, two), name
        assert spec.legacy_teacher_keys() == [], name
    assert load_run_spec(None, BASE).teacher_key() == "4214fd2ba0c858f0"


def test_legacy_keys_are_those_earlier_versions_gave_other_spellings():
    null = load_run_spec(None, {"teacher.epochs": 4})
    last = load_run_spec(None, {"teacher.epochs": 4, "teacher.checkpoint_epochs": [4]})
    assert null.teacher_key() == last.teacher_key() == "3380c0eeede22836"  # the explicit list's key, as before
    assert null.legacy_teacher_keys() == last.legacy_teacher_keys() == ["e60c8287bf86f85b"]  # null's earlier key
    unsorted = load_run_spec(None, {**BASE, "teacher.checkpoint_epochs": [4, 2]})
    assert unsorted.teacher_key() == "4214fd2ba0c858f0" and unsorted.legacy_teacher_keys() == ["663045d7a7577de2"]
    assert "457bdda9ae3bc669" in RunSpec().legacy_teacher_keys()  # the embedded default (null) as stored before


# --------------------------------------------------------------------------- the student key

# each group: spellings of one distillation (same result): one student key
SAME_STUDENT = [
    [{}, {"student.teacher_epoch": 4}],  # the default teacher checkpoint is the last saved
    [{}, {"device": "cpu", "compile": False}, {"data.num_workers": 2, "data.store_budget_gb": 1.0}],
    [{}, {"student.target_views": 3, "student.target_view_seed": 7}],  # online targets: no cache
    [{"student.kd.weight": 0.0}, {"student.kd.weight": 0.0, "student.kd.temperature": 2.0, "student.kd.loss": "dist"}],
    [{"student.optimizer.lr": 0.002}, {"student.optimizer.lr": 2e-3}],
    [{"student.model_kwargs": {"a": 1, "b": 2}}, {"student.model_kwargs": {"b": 2, "a": 1}}],
    [{}, {"teacher.checkpoint_epochs": [4, 2, 2]}],  # the teacher's key is one for both spellings
]


@pytest.mark.parametrize("spellings", SAME_STUDENT, ids=lambda group: str(group[-1]))
def test_spellings_of_one_distillation_share_its_student_key(spellings):
    keys = {load_run_spec(None, {**STUDENT_BASE, **s}).student_key() for s in spellings}
    assert len(keys) == 1, spellings


# each changes what the student learns: each must change the key
OTHER_STUDENTS = [
    {"seed": 1},
    {"data.img_size": 24},
    {"data.max_train_samples": 100},
    {"teacher.rho": 0.1},  # another teacher
    {"teacher.alpha": 0.8},
    {"student.teacher_epoch": 2},  # another checkpoint of the same teacher
    {"student.teacher_checkpoint": "/elsewhere/epoch_4"},
    {"student.model": "mobilenetv2_035"},
    {"student.model_kwargs": {"drop_rate": 0.1}},
    {"student.weights": "timm"},
    {"student.kd.loss": "dist"},
    {"student.kd.temperature": 2.0},
    {"student.kd.weight": 0.5},
    {"student.optimizer.lr": 1e-3},
    {"student.optimizer.name": "lamb"},
    {"student.schedule.warmup_epochs": 0.0},
    {"student.epochs": 5},
    {"student.batch_size": 16},
    {"student.teacher_targets": "cached"},
    {"student.teacher_targets": "cached", "student.target_views": 3},
    {"student.teacher_targets": "cached", "student.target_view_seed": 7},
]


def test_what_changes_the_distillation_changes_its_student_key():
    keys = [load_run_spec(None, {**STUDENT_BASE, **change}).student_key() for change in OTHER_STUDENTS]
    base = load_run_spec(None, STUDENT_BASE)
    keys += [base.student_key(), base.student_key(teacher_world_size=2), base.student_key(world_size=2)]
    assert len(set(keys)) == len(keys), [c for c, k in zip(OTHER_STUDENTS, keys) if keys.count(k) > 1]
    assert base.student_key() not in {base.teacher_key(), base.teacher_key(2)}


def test_a_dataset_in_its_root_is_fingerprinted_without_our_download_lock(tmp_path):
    """SVHN keeps its files directly in the root, beside the `.remem-svhn.lock` that every
    `data.download` build rewrites: its store was decoded anew on each run."""
    from remem_ray.storage.cache import node_lock

    class Svhn:  # no base_folder: the files directly in its root
        root = str(tmp_path)

    (tmp_path / "train_32x32.mat").write_bytes(b"1")
    with node_lock(tmp_path / ".remem-svhn.lock", "checking svhn"):
        before = source_identity(Svhn())
    os.utime(tmp_path / ".remem-svhn.lock", ns=(1, 1))  # a later build's lock
    with node_lock(tmp_path / ".remem-svhn.lock", "checking svhn"):
        assert source_identity(Svhn()) == before
    (tmp_path / "train_32x32.mat").write_bytes(b"22")
    assert source_identity(Svhn()) != before
