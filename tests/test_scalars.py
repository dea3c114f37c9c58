"""TensorBoard event files of a run, read back with TensorBoard's own reader, on both backends."""

from __future__ import annotations

from remem_ray.train.scalars import ScalarLog


def _read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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
