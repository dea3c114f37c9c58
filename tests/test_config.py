import subprocess
import sys
from pathlib import Path

import pytest

from remem_ray.cli import main
from remem_ray.config import RunSpec, load_run_spec, load_sweep_spec
from remem_ray.errors import ResourceError, SpecError
from remem_ray.spec_checks import check_spec

ROOT = Path(__file__).resolve().parents[1]

# The malformed-spec corpus (run and sweep specs, storage, resources) is tests/test_bad_input.py.


def test_missing_spec_file(in_tmp, capsys):
    assert main(["distill", "nowhere.yaml"]) == 2
    assert "spec: file not found: nowhere.yaml" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []


def test_cli_process_exits_2_without_traceback(in_tmp):
    (in_tmp / "bad.yaml").write_text("teacher:\n  rho: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "remem_ray.cli", "teacher", "bad.yaml"],
        capture_output=True,
        text=True,
        cwd=in_tmp,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "teacher.rho" in proc.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml"]


def test_help_lists_the_verbs():
    proc = subprocess.run(
        [sys.executable, "-m", "remem_ray.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for verb in ("teacher", "distill", "run"):
        assert verb in proc.stdout


def test_embedded_default_is_digits_and_valid():
    spec = RunSpec()
    assert spec.data.name == "digits"
    assert spec.teacher.rho >= 0.05 and spec.teacher.alpha < 1.0


def test_repository_specs_parse():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        load_run_spec(path)


def test_teacher_key_ignores_the_epoch_used_and_tracks_what_determines_the_teacher():
    base = load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10]})
    assert (
        base.teacher_key()
        == load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10], "student.teacher_epoch": 5}).teacher_key()
    )
    assert (
        base.teacher_key()
        == load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10], "student.epochs": 3}).teacher_key()
    )
    assert base.teacher_key() != base.teacher_key(world_size=4)  # per-worker batches: another run
    for change in ({"teacher.rho": 0.1}, {"teacher.alpha": 0.8}, {"seed": 1}, {"data.img_size": 24}):
        assert base.teacher_key() != load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10], **change}).teacher_key()


def test_compile_and_pipeline_default_to_auto_and_resolve_by_device():
    import torch

    from remem_ray.train.common import compiles

    spec = RunSpec()
    assert spec.compile == "auto" and spec.data.pipeline == "auto"
    assert not compiles(spec.compile, torch.device("cpu")) and compiles(spec.compile, torch.device("cuda"))
    forced = load_run_spec(None, {"compile": True})
    assert forced.compile is True and compiles(forced.compile, torch.device("cpu"))
    assert not compiles(load_run_spec(None, {"compile": False}).compile, torch.device("cuda"))


def test_where_batches_are_made_does_not_change_the_teacher_key_what_they_show_does():
    base = RunSpec()
    assert base.teacher_key() == load_run_spec(None, {"data.store_budget_gb": 1.0, "data.num_workers": 3}).teacher_key()
    assert base.teacher_key() != load_run_spec(None, {"data.pipeline": "device"}).teacher_key()
    assert base.teacher_key() != load_run_spec(None, {"data.store_size": 64}).teacher_key()


def test_reading_a_spec_has_no_side_effects_and_the_entry_check_names_the_field(tmp_path):
    """Validation is pure (no torch, no timm, no file lookups): a stored spec reads cheaply anywhere;
    the world-facing checks run once, at the entry points, through check_spec."""
    overrides = {"teacher.model": "vit_nonexistent_999", "student.weights": str(tmp_path / "missing.pth")}
    probe = (
        "import sys; from remem_ray.config import load_sweep_spec; "
        f"s = load_sweep_spec(None, {overrides!r}); "
        "print(s.teacher.model, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["vit_nonexistent_999", "False", "False"]

    with pytest.raises(SpecError, match=r"^teacher\.model: unknown timm model"):
        check_spec(load_run_spec(None, overrides))
    with pytest.raises(ResourceError, match=r"^student\.weights: weights file not found"):
        check_spec(load_run_spec(None, {"student.weights": str(tmp_path / "missing.pth")}))
    with pytest.raises(SpecError, match=r"^data\.name: unknown dataset 'imagenet9'"):
        check_spec(load_run_spec(None, {"data.name": "imagenet9"}))
    check_spec(load_run_spec(None))  # the embedded default passes


@pytest.mark.parametrize(
    "weights, kind",
    [
        (None, "none"),
        ("none", "none"),
        ("timm", "timm"),
        ("hf-hub:org/repo", "hf-hub"),
        ("s3://b/w.pt", "s3"),
        ("w.pt", "file"),
    ],
)
def test_weights_kind_is_the_one_reading_of_a_weights_string(weights, kind):
    from remem_ray.config import weights_kind

    assert weights_kind(weights) == kind


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher.epochz": 3}, "teacher.epochz: unknown key; did you mean epochs?"),
        ({"studnt": {}}, "studnt: unknown key; did you mean student?"),
        ({"teacher.optimizer": {"nme": "sgd"}}, "teacher.optimizer.nme: unknown key; did you mean name?"),
        ({"sweep": {"num_sample": 3}}, "sweep.num_sample: unknown key; did you mean num_samples?"),
        ({"sweep": {"asha": {"grace": 2}}}, "sweep.asha.grace: unknown key; did you mean grace_period?"),
        ({"sweep": {"search": {"rho": {"value": [0.1]}}}}, "sweep.search.rho.value: unknown key; did you mean values?"),
        (
            {"sweep": {"resources": {"teacher": {"num_worker": 2}}}},
            "sweep.resources.teacher.num_worker: unknown key; did you mean num_workers?",
        ),
        ({"foo": 1}, "foo: unknown key"),  # nothing like it: no guess
    ],
)
def test_an_unknown_key_names_the_known_one_it_most_looks_like(overrides, message):
    """A typo in a spec (`epochz`) said only "unknown key": the user had to find the field's name."""
    with pytest.raises(SpecError) as caught:
        load_sweep_spec(None, overrides)
    assert str(caught.value) == message


def test_the_entry_check_knows_the_classes_of_a_named_dataset(tmp_path):
    """model_kwargs.num_classes was compared with data.num_classes (synthetic only, 10 by default):
    cifar100's right 100 was refused and a wrong 10 passed."""
    cifar100 = {"data.name": "cifar100", "data.root": str(tmp_path)}
    check_spec(load_run_spec(None, {**cifar100, "teacher.model_kwargs": {"num_classes": 100}}))
    with pytest.raises(SpecError, match=r"^teacher\.model_kwargs\.num_classes: 10 where the data's classes gives 100"):
        check_spec(load_run_spec(None, {**cifar100, "teacher.model_kwargs": {"num_classes": 10}}))
    # an image folder's classes are known once it is read: the kwarg is not passed on, the data's count is
    folder = {"data.name": "imagefolder", "data.root": str(tmp_path)}
    check_spec(load_run_spec(None, {**folder, "student.model_kwargs": {"num_classes": 3}}))


def test_the_entry_check_refuses_a_missing_local_data_folder(tmp_path, monkeypatch):
    """Sweeps found a missing folder only in their trials (every trial failed, exit 1); a
    torchvision set without data.root lives in the node's cache folder, never the working folder
    (a sweep's processes run in other folders: `./data` was found by `remem run` only)."""
    from remem_ray.data.datasets import torchvision_root

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ResourceError, match=r"^data\.root: folder not found: .*/nowhere$"):
        check_spec(load_run_spec(None, {"data.name": "imagefolder", "data.root": str(tmp_path / "nowhere")}))
    cifar10 = load_run_spec(None, {"data.name": "cifar10"})
    assert torchvision_root(cifar10.data) == tmp_path / "cache" / "datasets"
    with pytest.raises(ResourceError, match=r"^data\.root: folder not found: .*/cache/datasets \(set data\.root"):
        check_spec(cifar10)
    check_spec(load_run_spec(None, {"data.name": "cifar10", "data.download": True}))  # torchvision makes it
    # `remem distill` builds its teacher from a checkpoint: the weights it started from may be gone
    check_spec(load_run_spec(None, {"teacher.weights": str(tmp_path / "w.pth")}), weights_of=("student",))
    # a cluster's trials read local files on its nodes: `sweep submit` and `--address` leave them to them
    elsewhere = {"data.name": "imagefolder", "data.root": str(tmp_path / "nowhere")}
    check_spec(load_run_spec(None, {**elsewhere, "teacher.weights": str(tmp_path / "w.pth")}), inputs_here=False)
    (tmp_path / "cache" / "datasets").mkdir(parents=True)
    check_spec(cifar10)


def test_the_entry_check_names_the_field_that_asks_for_reweighting_and_too_small_images():
    """A CNN teacher in a sweep whose search has alpha < 1 (the default search) was refused as
    `teacher.alpha` although its alpha was 1; images smaller than a ViT's patch failed at the first
    batch of every run, in a traceback."""
    from remem_ray.config import load_sweep_spec

    with pytest.raises(
        SpecError, match=r"^sweep\.search\.alpha: MLP reweighting .* resnet18 has none \(use alpha: \{values"
    ):
        check_spec(load_sweep_spec(None, {"teacher.model": "resnet18"}))
    with pytest.raises(SpecError, match=r"^teacher\.alpha: MLP reweighting .*\(use alpha: 1\)"):
        check_spec(load_run_spec(None, {"teacher.model": "resnet18", "teacher.alpha": 0.9}))
    check_spec(load_sweep_spec(None, {"teacher.model": "resnet18", "sweep.search.alpha": {"values": [1.0]}}))
    tiny_vit = {"teacher.model": "vit_tiny_patch16_224", "teacher.model_kwargs": {"depth": 1}}
    with pytest.raises(
        SpecError, match=r"^data\.img_size: teacher\.model vit_tiny_patch16_224 cannot take 8-px images"
    ):
        check_spec(load_run_spec(None, {**tiny_vit, "data.img_size": 8}))
    check_spec(load_run_spec(None, {**tiny_vit, "data.img_size": 16}))
