"""Sessions that stand in for Ray Train's in-process: a resume state kept in a file, an
interruption after a chosen epoch, a lease taken over by another holder."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.distributed as dist

from remem_ray.leases import Lease
from remem_ray.storage import Storage

# drop path draws from the global RNG every step: a resume that restored the wrong RNG would show
TINY_TEACHER_SPEC = {
    "data.name": "synthetic",
    "data.num_classes": 4,
    "data.samples_per_class": 30,
    "data.pipeline": "loader",
    "teacher.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.2},
    "teacher.epochs": 3,
    "teacher.batch_size": 16,
    "teacher.checkpoint_epochs": [3],
}


class Interrupted(Exception):
    pass


class FileSession:
    """A Session keeping the last state in a file (rank 0 writes, every rank restores, as Ray Train
    does), optionally interrupted right after epoch `stop_after` is reported."""

    def __init__(self, state_file: Path, rank: int = 0, world_size: int = 1, stop_after: int | None = None):
        self.state_file, self.stop_after = state_file, stop_after
        self.world_rank, self.local_rank, self.world_size = rank, rank, world_size
        self.reports: list[dict] = []

    def report(self, metrics, state=None, show=True) -> None:
        self.reports.append(dict(metrics))
        if state is not None and self.world_rank == 0:
            buf = io.BytesIO()
            torch.save(state, buf)
            self.state_file.write_bytes(buf.getvalue())
        if self.world_size > 1:
            dist.barrier()  # the state is written before anyone goes on (or stops)
        if metrics["epoch"] == self.stop_after:
            raise Interrupted

    def restore_state(self):
        if not self.state_file.exists():
            return None
        return torch.load(io.BytesIO(self.state_file.read_bytes()), weights_only=False)

    def log(self, message: str) -> None:
        pass

    def detail(self, message: str) -> None:
        pass


class TakeoverSession(FileSession):
    """After reporting epoch `after`, the holder's lease passes to another (its pause outlasted the
    stale time): the run learns it at its next epoch's check."""

    def __init__(self, state_file: Path, lease_folder: Storage, after: int):
        super().__init__(state_file)
        self.lease_folder, self.after, self.new_holder = lease_folder, after, None
        self.logs: list[str] = []

    def report(self, metrics, state=None, show=True) -> None:
        super().report(metrics, state)
        if metrics["epoch"] == self.after:
            clock = [0.0]
            self.new_holder = Lease(self.lease_folder, "sweep-2/trial_b", 1.0, clock=lambda: clock[0])
            assert not self.new_holder.try_acquire()
            clock[0] = 2.0
            assert self.new_holder.try_acquire()

    def log(self, message: str) -> None:
        self.logs.append(message)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
