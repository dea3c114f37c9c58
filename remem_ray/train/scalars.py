"""Per-epoch scalars of one Train run as TensorBoard event files under the storage root.

Rank 0 writes them with tensorboardX's synchronous EventsWriter (its SummaryWriter queues events
for a background process: an epoch's scalars would not be on disk when the epoch ends) into the
run's folder: directly for a local root, through a local folder copied up after each epoch for
s3:// roots. A resumed run adds a file beside the first; TensorBoard reads them as one run.
`tensorboard --logdir <root>/sweeps/<name>` then shows every teacher and student of a sweep.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from remem_ray.contract import EPOCH, METRIC
from remem_ray.storage import Storage

# result key -> TensorBoard tag (grouped into sections by the prefix)
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_acc": "accuracy/test",
    METRIC: "accuracy/best_val",
    "lr": "optim/lr",
    "images_per_s": "speed/images_per_s",
    "data_wait_share": "speed/data_wait_share",
    "epoch_seconds": "speed/epoch_seconds",
}


STAGING_ROOT = Path(tempfile.gettempdir()) / "remem-tb"  # s3:// runs' local copies, one folder a run
STALE_STAGING_S = 24 * 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_staging(root: Path = STAGING_ROOT, older_than_s: float = STALE_STAGING_S) -> None:
    """Remove the staging folders of runs whose process is gone (a stopped run's process is
    ended, so its close() never ran). Named `<pid>-...`; a folder is removed only if that pid is
    not alive here and it was untouched for `older_than_s`: a live run in another PID namespace
    sharing this /tmp writes its folder every epoch."""
    now = time.time()
    for folder in root.iterdir() if root.is_dir() else ():
        pid = folder.name.split("-", 1)[0]
        try:
            stale = pid.isdigit() and not _alive(int(pid)) and now - folder.stat().st_mtime > older_than_s
        except OSError:  # removed meanwhile by another run's sweep
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


class ScalarLog:
    """A run's per-epoch scalars as TensorBoard events. Nothing is created before the first
    epoch's write: a run refused at its start (weights not found, say) leaves no folder behind."""

    def __init__(self, target: Storage) -> None:
        self.target = target
        self.remote = target.uri().startswith("s3://")
        self.writer: Any = None  # tensorboardX's EventsWriter, from the first write

    def _open(self):
        from tensorboardX.event_file_writer import EventsWriter

        if self.remote:
            STAGING_ROOT.mkdir(parents=True, exist_ok=True)
            sweep_stale_staging()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=STAGING_ROOT))
        else:
            self.folder = Path(self.target.path())
        self.folder.mkdir(parents=True, exist_ok=True)
        return EventsWriter(str(self.folder / "events"), filename_suffix=f".{os.getpid()}")

    def write(self, metrics: dict[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self.writer is None:
            self.writer = self._open()
        step, now = int(metrics[EPOCH]), time.time()
        for key, tag in TAGS.items():
            value = metrics.get(key)
            if isinstance(value, int | float):
                self.writer.write_event(Event(wall_time=now, step=step, summary=scalar(tag, float(value))))
        self.writer.flush()
        if self.remote:
            for path in self.folder.iterdir():
                self.target.write_bytes(path.name, path.read_bytes())

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if self.remote:  # its files are in the bucket: a GPU node runs many runs and keeps none
            shutil.rmtree(self.folder, ignore_errors=True)
