"""TensorBoard event files of a run, read back with TensorBoard's own reader, on both backends."""

from __future__ import annotations

from remem_ray.train.scalars import ScalarLog


def _read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_refused_before_its_first_epoch_leaves_no_tensorboard_folder(tmp_path):
    """`remem teacher` with weights not found left runs/<name>/tensorboard/teacher/events.* (the
    log was opened as the run was prepared, before its model fetched the weights)."""
    from remem_ray.storage import Storage

    log = ScalarLog(Storage(str(tmp_path)).child("runs", "x", "tensorboard", "teacher"))
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_scalar_log_writes_per_epoch_series_tensorboard_reads(store, tmp_path):
    log = ScalarLog(store.child("tensorboard", "trial_1_student"))
    for epoch, acc in ((1, 0.25), (2, 0.5), (3, 0.75)):
        log.write({"epoch": epoch, "val_acc": acc, "train_loss": 1.0 / epoch, "lr": 1e-3, "note": "not a scalar"})
    log.close()
    if log.remote:  # an s3:// run's local copy goes with it (a GPU node runs many runs)
        assert not log.folder.exists()
    local = tmp_path / "events"
    local.mkdir()
    folder = store.child("tensorboard", "trial_1_student")
    for name in folder.list_dir():
        (local / name).write_bytes(folder.read_bytes(name))
    scalars = _read_scalars(local)
    assert [(s, round(v, 6)) for s, v in scalars["accuracy/val"]] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [s for s, _ in scalars["loss/train"]] == [1, 2, 3] and "optim/lr" in scalars
    assert not any("note" in tag for tag in scalars)


def test_staging_folders_of_ended_runs_are_swept_and_live_or_recent_ones_kept(tmp_path):
    """A stopped run's process is ended before its close() runs: the next s3:// run on the node
    removes such folders, but only where the pid is gone and the folder untouched for a day (a
    live run in another PID namespace sharing /tmp writes its own every epoch)."""
    import os
    import subprocess
    import sys
    import time

    from remem_ray.train.scalars import sweep_stale_staging

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    day_ago = time.time() - 25 * 3600
    folders = {
        "dead_old": tmp_path / f"{dead_pid}-aaaa",
        "dead_recent": tmp_path / f"{dead_pid}-bbbb",
        "alive_old": tmp_path / f"{os.getpid()}-cccc",
        "not_ours": tmp_path / "notes",
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "events").write_bytes(b"x")
        if name != "dead_recent":
            os.utime(folder, (day_ago, day_ago))
    sweep_stale_staging(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        folders[name].name for name in ("dead_recent", "alive_old", "not_ours")
    )


def test_a_run_that_fails_still_closes_its_scalar_log():
    """run_epochs closes the run's ScalarLog however the epochs end (its s3:// staging goes)."""
    from types import SimpleNamespace

    import pytest

    from remem_ray.train.loop import run_epochs

    closed = []
    scalars = SimpleNamespace(close=lambda: closed.append(True), write=lambda metrics: None)
    session = SimpleNamespace(restore_state=lambda: None)
    ctx = SimpleNamespace(started={}, scalars=scalars, session=session)

    class Failing:
        def begin(self, ctx, state):
            raise RuntimeError("the teacher checkpoint is gone")

    with pytest.raises(RuntimeError, match="checkpoint is gone"):
        run_epochs(ctx, Failing())
    assert closed == [True]
