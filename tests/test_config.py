import subprocess
import sys
from pathlib import Path

import pytest

from remem_ray.cli import main
from remem_ray.config import RunSpec, load_run_spec

ROOT = Path(__file__).resolve().parents[1]

# (case id, YAML text, text the one-line error must contain)
MALFORMED = [
    ("unknown-top-key", "foo: 1\n", "foo: unknown key"),
    ("unknown-nested-key", "teacher:\n  rhoo: 0.1\n", "teacher.rhoo: unknown key"),
    ("wrong-type", "teacher:\n  epochs: ten\n", "teacher.epochs"),
    ("negative-rho", "teacher:\n  rho: -0.01\n", "teacher.rho"),
    ("alpha-zero", "teacher:\n  alpha: 0\n", "teacher.alpha"),
    ("alpha-above-one", "teacher:\n  alpha: 1.5\n", "teacher.alpha"),
    ("checkpoint-epoch-zero", "teacher:\n  epochs: 5\n  checkpoint_epochs: [0, 5]\n", "checkpoint_epochs"),
    ("checkpoint-epoch-past-end", "teacher:\n  epochs: 5\n  checkpoint_epochs: [6]\n", "checkpoint_epochs"),
    ("unknown-teacher-model", "teacher:\n  model: vit_nonexistent_999\n", "teacher.model"),
    ("unknown-student-model", "student:\n  model: resnet_nonexistent\n", "student.model"),
    ("unknown-dataset", "data:\n  name: imagenet9\n", "data.name"),
    ("python-object-tag", "teacher: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("not-a-mapping", "- teacher\n- student\n", "must hold a mapping"),
    ("yaml-syntax", "teacher: [1, 2\n", "invalid YAML"),
    ("parent-dir-in-storage", "storage:\n  root: ../elsewhere\n", "storage.root"),
    ("unsupported-scheme", "storage:\n  root: ftp://host/x\n", "storage.root"),
    ("endpoint-without-scheme", "storage:\n  root: s3://b/p\n  endpoint: 127.0.0.1:9000\n", "storage.endpoint"),
    ("reweight-non-vit", "teacher:\n  model: resnet18\n  alpha: 0.9\n", "teacher.alpha"),
    ("img-size-too-small", "data:\n  img_size: 4\n", "data.img_size"),
    ("missing-weights-file", "teacher:\n  weights: /nonexistent/w.pth\n", "teacher.weights"),
    ("zero-temperature", "student:\n  kd:\n    temperature: 0\n", "student.kd.temperature"),
    ("bad-name", "name: a/b\n", "name"),
    ("teacher-epoch-not-saved", "teacher:\n  epochs: 4\nstudent:\n  teacher_epoch: 2\n", "student.teacher_epoch"),
    ("bad-model-kwargs", "teacher:\n  model_kwargs: {no_such_arg: 1}\n", "teacher.model_kwargs"),
    ("unknown-optimizer", "teacher:\n  optimizer:\n    name: lamb\n", "teacher.optimizer.name"),
    ("imagefolder-without-root", "data:\n  name: imagefolder\n", "data.root"),
    ("negative-epochs", "student:\n  epochs: -3\n", "student.epochs"),
    ("kd-weight-above-one", "student:\n  kd:\n    weight: 1.2\n", "student.kd.weight"),
]


@pytest.mark.parametrize("case, text, expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_spec_exits_2_naming_the_field_and_writes_nothing(case, text, expected, in_tmp, capsys):
    spec = in_tmp / "spec.yaml"
    spec.write_text(text)
    for verb in ("teacher", "run"):
        assert main([verb, str(spec)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("remem: error: ") and err.count("\n") == 1, err
        assert expected in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["spec.yaml"]


def test_missing_spec_file(in_tmp, capsys):
    assert main(["distill", "nowhere.yaml"]) == 2
    assert "spec: file not found: nowhere.yaml" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []


def test_cli_process_exits_2_without_traceback(in_tmp):
    (in_tmp / "bad.yaml").write_text("teacher:\n  rho: -1\n")
    proc = subprocess.run([sys.executable, "-m", "remem_ray.cli", "teacher", "bad.yaml"],
                          capture_output=True, text=True, cwd=in_tmp, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "teacher.rho" in proc.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["bad.yaml"]


def test_help_lists_the_verbs():
    proc = subprocess.run([sys.executable, "-m", "remem_ray.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
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
    assert base.teacher_key() == load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10],
                                                      "student.teacher_epoch": 5}).teacher_key()
    assert base.teacher_key() == load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10],
                                                      "student.epochs": 3}).teacher_key()
    assert base.teacher_key() != base.teacher_key(world_size=4)  # per-worker batches: another run
    for change in ({"teacher.rho": 0.1}, {"teacher.alpha": 0.8}, {"seed": 1}, {"data.img_size": 24}):
        assert base.teacher_key() != load_run_spec(None, {"teacher.checkpoint_epochs": [5, 10],
                                                          **change}).teacher_key()
