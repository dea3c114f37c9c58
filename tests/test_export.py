"""remem_ray.export: a student checkpoint as a timm folder (and ONNX) that timm alone loads."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.exports import score_in_fresh_process

from remem_ray.checkpoints import model_meta, write_checkpoint
from remem_ray.cli import main
from remem_ray.errors import UserInputError
from remem_ray.export import CARD_FILE, CLAIM_FILE, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, export_student
from remem_ray.models import create_model, reweight_mlp
from remem_ray.storage import Storage

STUDENT, CLASSES, SIZE = "resnet10t", 5, 16
EVAL_VIEW = {"img_size": SIZE, "crop_pct": 0.9, "interpolation": "bicubic"}


NAMES = [f"class {i}" for i in range(CLASSES)]


def _student_checkpoint(folder, name=STUDENT, kwargs=None, reweight: float | None = None, names=NAMES):
    torch.manual_seed(0)
    model = create_model(name, CLASSES, SIZE, kwargs or {})
    if reweight is not None:
        reweight_mlp(model, reweight, "remem")
    metrics = {"val_acc": 0.75, "test_acc": 0.7}
    meta = model_meta(
        model, name, kwargs or {}, CLASSES, SIZE, role="student", epoch=3, metrics=metrics, class_names=names
    )
    write_checkpoint(Storage(str(folder)), "best_epoch_3", model, {**meta, "eval_view": EVAL_VIEW})
    return model.eval()


def test_an_exported_student_loads_in_plain_timm_and_computes_what_it_computed(tmp_path):
    model = _student_checkpoint(tmp_path / "ck")
    target = tmp_path / "shipped"
    exported = export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", str(target), {"sweep": "demo"}, onnx=True)
    assert sorted(p.name for p in target.iterdir()) == sorted([CARD_FILE, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE])
    assert exported.onnx_max_diff is not None and exported.onnx_max_diff <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".remem-export-")]  # staging renamed away
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o666 & ~umask}

    images = torch.rand(7, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # a batch of 7: dynamic
    seen = score_in_fresh_process(target, images.numpy(), tmp_path / "fresh")
    assert seen["remem_ray imported"] is False
    with torch.no_grad():
        from remem_ray.models import normalizer_for

        want = model(normalizer_for(model)(images)).numpy()
    np.testing.assert_array_equal(seen["logits"], want)  # the same weights, the same normalisation
    assert np.abs(seen["onnx_logits"] - want).max() <= 1e-4

    config = json.loads((target / CONFIG_FILE).read_text())
    assert config["architecture"] == STUDENT and config["num_classes"] == CLASSES
    # what each output means, as timm gives it (an image-folder student exported bare indices)
    assert config["label_names"] == NAMES and seen["label_names"] == NAMES
    assert f"| classes | {CLASSES} (0: class 0, 1: class 1," in (target / CARD_FILE).read_text()
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, SIZE, SIZE] and seen["input_size"] == [3, SIZE, SIZE]
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"  # how the checkpoint was evaluated
    assert "tag" not in cfg and "license" not in cfg  # the hub weights' provenance is not these weights'
    card = (target / CARD_FILE).read_text()
    assert hashlib.sha256((target / WEIGHTS_FILE).read_bytes()).hexdigest() in card
    assert "| sweep | demo |" in card and "| val accuracy | 0.7500 |" in card and "| epoch | 3 |" in card
    assert b"pickle" not in (target / WEIGHTS_FILE).read_bytes()[:200]  # safetensors header, not a pickle
    from safetensors import safe_open

    with safe_open(str(target / WEIGHTS_FILE), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_export_to_s3_uploads_every_file_and_the_card_last(tmp_path, moto_endpoint, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="ship")
    _student_checkpoint(tmp_path / "ck")
    puts = []
    original = Storage.write_bytes
    monkeypatch.setattr(Storage, "write_bytes", lambda self, rel, data: (puts.append(rel), original(self, rel, data)))
    export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", "s3://ship/v1", endpoint=moto_endpoint)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="ship")["Contents"]}
    assert keys == {f"v1/{n}" for n in (CARD_FILE, CONFIG_FILE, WEIGHTS_FILE)}
    assert puts[-1] == CARD_FILE  # a target with a card is whole
    # timm reads local folders only: the card's usage said local-dir:s3://..., which timm cannot load
    card = client.get_object(Bucket="ship", Key=f"v1/{CARD_FILE}")["Body"].read().decode()
    assert "local-dir:s3://" not in card and "copy the folder down first" in card
    with pytest.raises(Exception, match="exists and is not empty"):
        export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", "s3://ship/v1", endpoint=moto_endpoint)


def _cli(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("target-not-empty", "--to: "),
        ("target-is-a-file", "is a file"),
        ("no-checkpoint", "no complete checkpoint"),
        ("reweighted-teacher", "MLP-reweighted"),
        ("not-a-timm-architecture", "registered by remem_ray"),
        ("onnx-cannot-trace", "--onnx: resnet10t cannot be exported to ONNX"),
    ],
)
def test_bad_export_input_exits_2_with_one_line_and_writes_nothing(case, expected, tmp_path, capsys, monkeypatch):
    ck, target = tmp_path / "ck", tmp_path / "out"
    if case == "reweighted-teacher":
        _student_checkpoint(ck, "vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}, reweight=0.9)
    elif case == "not-a-timm-architecture":
        _student_checkpoint(ck, "vit_micro_patch4", {"depth": 1})
    elif case != "no-checkpoint":
        _student_checkpoint(ck)
    if case == "target-not-empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    if case == "target-is-a-file":
        target.write_text("mine")
    if case == "onnx-cannot-trace":

        def untraceable(*args, **kwargs):
            raise RuntimeError("Unsupported: an op the exporter does not know\nmore detail")

        monkeypatch.setattr(torch.onnx, "export", untraceable)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, err = _cli(["export", str(ck / "best_epoch_3"), "--to", str(target), "--onnx"], capsys)
    assert rc == 2 and err.startswith("remem: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind


@pytest.mark.parametrize("command", ["export", "sweep export"])
def test_an_exports_bad_arguments_are_refused_before_torch_is_imported(command, tmp_path):
    """The arguments are checked before any model is read: in a fresh process a refusal came after
    4 s of torch and timm imports (7 s in all for `remem sweep export --trial nope`, 1.8 s now; the
    smoke test refuses a --trial and a --to in full sweeps). `export`: a --to that is not empty;
    `sweep export`: a sweep that is not there. Failed before, both: torch and timm imported."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    if command == "export":
        _student_checkpoint(tmp_path / "ck")
        args = ["export", str(tmp_path / "ck" / "best_epoch_3")]
    else:  # a sweep that does not exist: refused while the sweep is looked up, before the target
        args = ["sweep", "export", "nothing-here", "--storage", str(tmp_path / "results")]
    probe = (
        "import sys; from remem_ray.cli import main; rc = main(sys.argv[1:]); "
        "print([m for m in ('torch', 'timm') if m in sys.modules]); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args, "--to", str(target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("remem: error: ") and proc.stderr.count("\n") == 1
    assert ("exists and is not empty" if command == "export" else "nothing-here") in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_export_into_an_empty_existing_folder_and_a_new_nested_one(tmp_path, capsys):
    _student_checkpoint(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "a" / "b" / "new"):
        rc, err = _cli(["export", str(tmp_path / "ck" / "best_epoch_3"), "--to", str(target)], capsys)
        assert rc == 0, err
        assert (target / WEIGHTS_FILE).is_file() and (target / CARD_FILE).is_file()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_of_two_exports_racing_to_one_target_one_lands_and_the_other_writes_nothing(
    tmp_path, monkeypatch, request, backend
):
    """Export A passes its target check, then export B runs whole into the same target before A
    places anything. A must stop with one line and leave B's folder as B wrote it. Before the
    fence: locally A's rename raised a bare OSError (or nested its staging folder inside B's); on
    S3 A uploaded over B's files, its card last (the target then said A of B's upload)."""
    import remem_ray.export as export

    _student_checkpoint(tmp_path / "ck")
    if backend == "local":
        target = str(tmp_path / "a" / "shipped")
        endpoint = None
    else:
        s3 = request.getfixturevalue("s3")
        target, endpoint = f"s3://{s3['bucket']}/v1", s3["endpoint"]
    source = Storage(str(tmp_path / "ck"))
    original = export.write_timm_folder
    calls = []

    def b_runs_whole_first(model, meta, folder):
        calls.append(folder)
        if len(calls) == 1:  # inside A, after its check: B starts and finishes
            export_student(source, "best_epoch_3", target, {"sweep": "B"}, endpoint=endpoint)
        return original(model, meta, folder)

    monkeypatch.setattr(export, "write_timm_folder", b_runs_whole_first)
    with pytest.raises(UserInputError, match="filled by another export while this one ran"):
        export_student(source, "best_epoch_3", target, {"sweep": "A"}, endpoint=endpoint)
    out = Storage(target, endpoint)
    assert out.list_dir() == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])  # no claim, no staging left
    assert "| sweep | B |" in out.read_text(CARD_FILE)
    if backend == "local":
        assert not list((tmp_path / "a").glob(".remem-export-*"))


def test_an_s3_export_refuses_a_target_whose_claim_is_held(tmp_path, s3):
    """A claim object alone: an export uploading now, or one cut off; named, and nothing written."""
    _student_checkpoint(tmp_path / "ck")
    target = f"s3://{s3['bucket']}/v2"
    out = Storage(target, s3["endpoint"])
    assert out.create_exclusive(CLAIM_FILE, b"someone")
    with pytest.raises(UserInputError, match="an export to .* is running, or one was cut off"):
        export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", target, endpoint=s3["endpoint"])
    assert out.list_dir() == [CLAIM_FILE]


@pytest.mark.parametrize("below", ["afile/sub", "afile/sub/deeper"])
def test_a_target_below_a_file_is_one_line_and_leaves_nothing(tmp_path, capsys, below):
    """Such targets failed with bare tracebacks (FileExistsError, NotADirectoryError) after the
    model had loaded; any OSError placing the folder is now one line naming --to."""
    _student_checkpoint(tmp_path / "ck")
    (tmp_path / "afile").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, err = _cli(["export", str(tmp_path / "ck" / "best_epoch_3"), "--to", str(tmp_path / below)], capsys)
    assert rc == 2 and err.startswith("remem: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--to" in err or "storage" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_an_s3_export_whose_claim_changed_hands_stops_short_of_the_card(tmp_path, s3, monkeypatch):
    """A claim that is no longer ours before the card (a server that ignored If-None-Match let a
    second export claim too): this one removes what it uploaded, writes no card and leaves the
    other's claim alone."""
    _student_checkpoint(tmp_path / "ck")
    target = f"s3://{s3['bucket']}/v3"
    original = Storage.write_bytes

    def taken_over_midway(self, rel, data):
        original(self, rel, data)
        if rel == WEIGHTS_FILE:
            original(self, CLAIM_FILE, b"another exporter's token")

    monkeypatch.setattr(Storage, "write_bytes", taken_over_midway)
    with pytest.raises(UserInputError, match="filled by another export"):
        export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", target, endpoint=s3["endpoint"])
    out = Storage(target, s3["endpoint"])
    assert out.list_dir() == [CLAIM_FILE] and out.read_text(CLAIM_FILE) == "another exporter's token"


def test_an_s3_export_whose_claim_put_was_retried_after_it_landed_goes_on(tmp_path, s3, monkeypatch):
    """The claim's conditional PUT landed, its answer was lost and the retry got 412: the claim is
    ours (our token). Before, the export called it another's, stopped and left its own claim, which
    refused every later export to that target."""
    _student_checkpoint(tmp_path / "ck")
    target = f"s3://{s3['bucket']}/v4"
    original = Storage.create_exclusive

    def landed_then_refused(self, rel, data):
        created = original(self, rel, data)
        return False if rel == CLAIM_FILE else created

    monkeypatch.setattr(Storage, "create_exclusive", landed_then_refused)
    export_student(Storage(str(tmp_path / "ck")), "best_epoch_3", target, endpoint=s3["endpoint"])
    assert Storage(target, s3["endpoint"]).list_dir() == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])


def test_a_student_named_by_a_hub_repo_is_refused_for_what_it_is(monkeypatch, tmp_path):
    """`hf-hub:ORG/REPO` was refused as "registered by remem_ray, not timm", which it is not."""
    import remem_ray.checkpoints as checkpoints
    import remem_ray.export as export

    # load_student imports read_checkpoint when it runs (torch comes with it)
    monkeypatch.setattr(checkpoints, "read_checkpoint", lambda source, rel: ({}, {"model": "hf-hub:org/repo"}))
    with pytest.raises(UserInputError, match=r"^export: hf-hub:org/repo names a hub repo, not a timm architecture"):
        export.load_student(Storage(str(tmp_path)), "best_epoch_1")


def test_an_onnx_check_allows_rounding_that_grows_with_the_logits(tmp_path):
    """A fixed 1e-4 refused correct exports: float32 rounding grows with the logits (an
    EfficientNetV2 student with logits of 228 differed by 8e-4, 4e-6 of them)."""
    from remem_ray.export import onnx_tolerance, write_onnx

    torch.manual_seed(0)
    model = create_model(STUDENT, CLASSES, SIZE, {}).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(3e4)  # logits in the thousands
    diff = write_onnx(model, {"img_size": SIZE, "model": STUDENT}, tmp_path)
    with torch.no_grad():
        largest = float(model(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))).abs().max())
    assert largest > 1e3 and 1e-4 < diff <= onnx_tolerance(np.array([largest]))
