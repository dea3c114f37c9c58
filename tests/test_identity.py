"""remem_ray.storage.identity and remem_ray.inputs: what an input holds, read as a sweep starts, in the
keys of what is trained from it."""

from __future__ import annotations

import os

import pytest

from remem_ray.config import SweepSpec
from remem_ray.inputs import with_input_identities
from remem_ray.storage.identity import IMAGE_SUFFIXES, file_identity, folder_identity


def _images(root, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def test_the_suffixes_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(IMAGE_SUFFIXES) == set(IMG_EXTENSIONS)


def test_a_folders_identity_follows_its_images_names_and_sizes_on_every_backend(store, tmp_path):
    files = {"train/cat/1.png": b"aaaa", "train/dog/2.JPG": b"bb", "notes.txt": b"n"}
    local = _images(tmp_path / "local", files)
    store.upload_dir(local, "data")
    # the same images here and on S3 (a node's fetched copy keys its stores the same)
    assert folder_identity(store.uri("data"), store.endpoint) == folder_identity(local)
    before = folder_identity(local)
    (tmp_path / "local" / "notes.txt").write_bytes(b"not an image")  # nothing ImageFolder reads
    os.utime(tmp_path / "local" / "train/cat/1.png", (0, 0))  # a copy's new times
    assert folder_identity(local) == before
    assert folder_identity(_images(tmp_path / "local", {"train/cat/3.png": b"c"})) != before  # an image added
    os.rename(tmp_path / "local/train/cat/3.png", tmp_path / "local/train/dog/3.png")  # relabelled
    relabelled = folder_identity(local)
    assert relabelled not in (before, None)
    assert folder_identity(str(tmp_path / "missing")) is None
    assert folder_identity(_images(tmp_path / "empty", {"a.txt": b"x"})) is None


def test_a_weights_files_identity_changes_when_it_is_written_again(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first")
    first = file_identity(str(weights))
    weights.write_bytes(b"second")
    os.utime(weights, ns=(1, 1))  # even a same-second rewrite: the size and the time differ
    assert file_identity(str(weights)) not in (first, None)
    assert file_identity(str(tmp_path / "none.pt")) is None


def _folder_spec(tmp_path, **overrides) -> SweepSpec:
    data = {"name": "imagefolder", "root": str(tmp_path / "data")}
    raw = {"data": data, "storage": {"root": str(tmp_path / "results")}, **overrides}
    return SweepSpec.model_validate(raw)


def test_a_changed_image_folder_gives_its_trials_new_teacher_and_student_keys(tmp_path):
    """A teacher of an image folder was keyed by its path: images added to the folder, every later
    sweep on the root reused the teacher trained without them (and its student). Failed before:
    the keys stayed the same."""
    _images(tmp_path / "data", {"cat/1.png": b"aaaa", "dog/2.png": b"bb"})
    spec, unread = with_input_identities(_folder_spec(tmp_path))
    assert unread == [] and spec.data.root_identity is not None
    keys = spec.trial_keys(spec.run_spec({}))
    _images(tmp_path / "data", {"dog/3.png": b"ccc"})
    changed, _ = with_input_identities(spec)  # a resume, or the next sweep, reads it again
    new_keys = changed.trial_keys(changed.run_spec({}))
    assert new_keys[0] != keys[0] and new_keys[1] != keys[1]
    assert with_input_identities(changed)[0].trial_keys(changed.run_spec({})) == new_keys  # unchanged: same keys


def test_a_rewritten_weights_file_gives_new_keys_and_inputs_without_identity_keep_their_keys(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"v1")
    spec = SweepSpec.model_validate(
        {"teacher": {"weights": str(weights)}, "storage": {"root": str(tmp_path / "results")}}
    )
    identified, unread = with_input_identities(spec)
    assert unread == [] and identified.teacher.weights_identity == file_identity(str(weights))
    assert identified.student.weights_identity is None and identified.data.root_identity is None
    weights.write_bytes(b"v2 longer")
    again, _ = with_input_identities(identified)
    assert again.teacher_key() != identified.teacher_key()
    # digits and no weights: nothing to identify, the keys earlier versions gave
    plain = SweepSpec.model_validate({"storage": {"root": str(tmp_path / "results")}})
    assert with_input_identities(plain)[0].trial_keys(plain.run_spec({})) == plain.trial_keys(plain.run_spec({}))


def test_an_input_this_machine_cannot_read_keeps_its_location_key_and_says_so(tmp_path):
    spec, unread = with_input_identities(_folder_spec(tmp_path))  # no folder here (a cluster's path)
    assert spec.data.root_identity is None
    assert spec.teacher_key() == _folder_spec(tmp_path).teacher_key()
    assert len(unread) == 1 and unread[0].startswith(f"data.root: nothing at {tmp_path / 'data'} from this machine;")


def test_an_identity_written_in_a_spec_is_replaced_by_what_the_driver_reads(tmp_path):
    _images(tmp_path / "data", {"cat/1.png": b"a", "dog/2.png": b"b"})
    data = {"name": "imagefolder", "root": str(tmp_path / "data"), "root_identity": "forged"}
    spec = SweepSpec.model_validate(
        {"data": data, "teacher": {"weights_identity": "forged"}, "storage": {"root": str(tmp_path / "results")}}
    )
    identified, _ = with_input_identities(spec)
    assert identified.data.root_identity == folder_identity(str(tmp_path / "data"))
    assert identified.teacher.weights_identity is None  # no weights file to identify


def test_only_what_imagefolder_reads_counts_not_files_beside_its_class_folders(tmp_path):
    """A plot or a loose image beside the class folders, or a folder beside train/ and val/, is no
    image a run reads: it changed the identity and every sweep trained anew (a review's find)."""
    root = tmp_path / "data"
    _images(root, {"train/cat/1.png": b"a", "train/dog/2.png": b"bb", "val/cat/3.png": b"c"})
    before = folder_identity(str(root))
    _images(root, {"preview.png": b"p", "train/loose.png": b"l", "plots/acc.png": b"x"})
    assert folder_identity(str(root)) == before
    _images(root, {"val/dog/4.png": b"d"})
    assert folder_identity(str(root)) != before
    flat = tmp_path / "flat"  # no split folders: the root's class folders
    _images(flat, {"cat/1.png": b"a", "top.png": b"t"})
    assert folder_identity(str(flat)) == folder_identity(_images(tmp_path / "flat2", {"cat/1.png": b"a"}))


def test_a_local_weights_file_is_known_by_its_bytes_so_every_copy_is_the_same(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w.pt").write_bytes(b"same bytes")
    (tmp_path / "b" / "w.pt").write_bytes(b"same bytes")
    os.utime(tmp_path / "b" / "w.pt", ns=(5, 5))
    assert file_identity(str(tmp_path / "a/w.pt")) == file_identity(str(tmp_path / "b/w.pt"))
    assert file_identity(str(tmp_path / "a/w.pt")).startswith("sha256:")


def test_a_resume_keeps_the_identities_its_sweep_began_with_and_refuses_a_changed_input(tmp_path):
    from remem_ray.errors import UserInputError
    from remem_ray.inputs import as_begun, identities

    _images(tmp_path / "data", {"cat/1.png": b"a", "dog/2.png": b"b"})
    spec = _folder_spec(tmp_path)
    began, _ = with_input_identities(spec)
    resumed, notes = as_begun(spec, identities(began))
    assert resumed.trial_keys(resumed.run_spec({})) == began.trial_keys(began.run_spec({})) and notes == []
    # begun before identities: keyed by location, as its trials and its searcher were
    assert as_begun(spec, None) == (spec, [])
    _images(tmp_path / "data", {"dog/3.png": b"c"})
    with pytest.raises(UserInputError, match=rf"^data.root: {tmp_path / 'data'} changed since the sweep began"):
        as_begun(spec, identities(began))
    # from a machine without the folder (a cluster's path): as begun, no note
    elsewhere = spec.model_copy(update={"data": spec.data.model_copy(update={"root": str(tmp_path / "gone")})})
    resumed, notes = as_begun(elsewhere, identities(began))
    assert resumed.data.root_identity == began.data.root_identity and notes == []


def test_remem_sweep_resume_refuses_a_changed_input_before_ray_starts(tmp_path, capsys):
    """Failed before: the resume read the folder again and its restarted trials trained under new
    keys beside finished trials of the old images (a restarted student went on from a teacher of
    the old images and was stored under the new key)."""
    import json

    import ray

    from remem_ray.cli import main

    _images(tmp_path / "data", {"cat/1.png": b"a", "dog/2.png": b"b"})
    spec = _folder_spec(tmp_path, name="changed")
    began, _ = with_input_identities(spec)
    folder = tmp_path / "results" / "sweeps" / "changed"
    folder.mkdir(parents=True)
    (folder / "sweep_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    (folder / "inputs.json").write_text(json.dumps({"data.root": began.data.root_identity}))
    (folder / "tuner.pkl").write_bytes(b"")  # a Tune experiment to restore
    _images(tmp_path / "data", {"dog/3.png": b"c"})
    assert main(["sweep", "resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: data.root: ") and "changed since the sweep began" in err
    assert err.count("\n") == 1 and not ray.is_initialized()
