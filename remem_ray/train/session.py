"""Where a loop reports to: the console in-process, or ray.train inside a Ray Train worker.

The loops call only this small interface, so the same function runs in a test, under
`remem teacher`, or as a Ray Train `train_loop_per_worker` with one or many workers.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.distributed as dist

from remem_ray.console import say
from remem_ray.contract import EPOCH, EPOCHS, METRIC, Session
from remem_ray.errors import ResourceError
from remem_ray.storage import Storage
from remem_ray.teacher_layout import ADOPTED_STATE_FILE, STATE_FILE

_SHOWN = ("train_loss", "train_acc", "val_acc", "test_acc", METRIC, "lr")


def _format_metrics(metrics: dict[str, Any]) -> str:
    """One short progress line: epoch, loss, accuracies, lr, time."""
    head = f"epoch {metrics[EPOCH]}/{metrics[EPOCHS]}" if EPOCHS in metrics else f"epoch {metrics.get(EPOCH)}"
    parts = [head] + [f"{k} {metrics[k]:.4g}" for k in _SHOWN if k in metrics]
    if "images_per_s" in metrics:  # a starved GPU shows as a large data wait
        parts.append(f"{metrics['images_per_s']:.0f} img/s (data wait {metrics['data_wait_share']:.0%})")
    if "epoch_seconds" in metrics:
        parts.append(f"{metrics['epoch_seconds']:.1f}s")
    return "  ".join(parts)


# Between the epochs a run always shows, the first epoch to end this long after the last line
# shown: a run of minute-long epochs shows every one, a fast one's (the digits demo: 1-2 s a
# teacher epoch) only the few that matter
EPOCH_LINE_EVERY_S = 60.0


class EpochLines:
    """Which of a run's epochs get a line on the sweep's console (every epoch's is in its log).

    Always the run's first and last epoch and those the task names (a teacher's saved epochs, the
    checkpoints students distil from); in between, an epoch when `every_s` has passed since the
    last line shown. A sweep of many fast teachers would otherwise print a screen a minute.
    """

    def __init__(
        self,
        first: int,
        last: int,
        named: Collection[int],
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.always = {first, last, *named}
        self.every_s = EPOCH_LINE_EVERY_S if every_s is None else every_s
        self.clock = clock
        self.shown_at = clock()

    def show(self, epoch: int) -> bool:
        now = self.clock()
        if epoch in self.always or now - self.shown_at >= self.every_s:
            self.shown_at = now
            return True
        return False


class ConsoleSession:
    """In-process: one line of progress per epoch on stderr; nothing to resume from."""

    world_rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, prefix: str = "", quiet: bool = False) -> None:
        self.prefix, self.quiet = prefix, quiet
        self.history: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None, show: bool = True) -> None:
        self.history.append(dict(metrics))
        self.log(_format_metrics(metrics))  # one run in a terminal: every epoch shows

    def restore_state(self) -> dict[str, Any] | None:
        return None

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {self.prefix}{message}", file=sys.stderr, flush=True)

    detail = log


class RayTrainSession:
    """Inside a Ray Train worker: metrics through ray.train.report, state as a Train checkpoint."""

    def __init__(self, prefix: str = "") -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.local_rank = ctx.get_local_rank()
        self.world_size = ctx.get_world_size()
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        # every rank, for the sweep's log only: a sweep's driver learns from it whose process this
        # is, and names the trial on a traceback of it (Ray names the process alone)
        sys.stdout.write(f"{prefix}worker rank {self.world_rank} of {self.world_size}, pid {os.getpid()}\n")
        sys.stdout.flush()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None, show: bool = True) -> None:
        self.history.append(dict(metrics))
        (self.log if show else self.detail)(_format_metrics(metrics))
        if state is None or self.world_rank != 0:
            self._train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="remem-state-") as tmp:
            torch.save(state, os.path.join(tmp, STATE_FILE))
            self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(tmp))

    def restore_state(self) -> dict[str, Any] | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            with open(os.path.join(path, STATE_FILE), "rb") as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)

    def log(self, message: str) -> None:
        if self.world_rank == 0:
            say(f"{self.prefix}{message}")

    def detail(self, message: str) -> None:
        if self.world_rank == 0:
            sys.stdout.write(f"{self.prefix}{message}\n")  # not print: Train's print echoes twice
            sys.stdout.flush()


class StoredStateSession:
    """Wraps a session: metrics go to its console only, the resume state to a file in storage.

    For a teacher trained inside a trial's Train run: its resume state belongs to the teacher
    (whichever trial holds the key's lease next resumes it), not to the run, and its epochs are
    not the trial's results (Tune's scheduler sees student epochs only).
    """

    def __init__(self, base: Session, storage: Storage) -> None:
        self.base, self.storage = base, storage
        self.world_rank, self.local_rank, self.world_size = base.world_rank, base.local_rank, base.world_size
        self.history: list[dict[str, Any]] = []
        self._adopted_removed = False

    def adopt(self, earlier: Storage) -> None:
        """Continue from `earlier`'s state (another holder's, only ever read) while this run has
        none: rank 0 copies it here if it loads, then every rank reads this run's folder alone,
        so no two ranks can restore different states of a holder still writing there.

        The copy is kept apart from this run's own state.pt until the run writes one (after its
        first epoch, by then holding every earlier checkpoint): a state.pt names epochs whose
        checkpoints are in its folder, and a holder that ends before that leaves the next one
        to resume from `earlier`, which has them (before, it resumed from this folder, found
        no checkpoints and trained from epoch 1)."""
        if self.world_rank == 0 and not self._holds_a_state() and earlier.is_file(STATE_FILE):
            data = earlier.read_bytes(STATE_FILE)
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 (any unreadable state: train without it)
                self.base.log(f"not resuming from {earlier.uri(STATE_FILE)}: it does not load ({exc})")
            else:
                self.storage.write_bytes(ADOPTED_STATE_FILE, data)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None, show: bool = True) -> None:
        self.history.append(dict(metrics))
        (self.base.log if show else self.base.detail)(_format_metrics(metrics))
        if state is not None and self.world_rank == 0:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.storage.write_bytes(STATE_FILE, buffer.getvalue())  # whole-object write: never half a state
            if not self._adopted_removed:  # read only by this run, and from now on its own state is read
                with contextlib.suppress(ResourceError):  # left, it only takes room (a ViT-B's: 0.7 GB)
                    self.storage.delete_file(ADOPTED_STATE_FILE)
                self._adopted_removed = True

    def _holds_a_state(self) -> bool:
        return any(self.storage.is_file(name) for name in (STATE_FILE, ADOPTED_STATE_FILE))

    def restore_state(self) -> dict[str, Any] | None:
        """This run's own state, else the one it adopted, else None."""
        for name in (STATE_FILE, ADOPTED_STATE_FILE):
            if self.storage.is_file(name):
                return torch.load(io.BytesIO(self.storage.read_bytes(name)), map_location="cpu", weights_only=False)
        return None

    def log(self, message: str) -> None:
        self.base.log(message)

    def detail(self, message: str) -> None:
        self.base.detail(message)


def in_ray_train_worker() -> bool:
    """True inside a function launched by a Ray Train trainer (never imports Ray itself)."""
    if "ray.train" not in sys.modules:
        return False
    import ray.train

    try:
        ray.train.get_context()
    except (RuntimeError, DeprecationWarning):
        return False
    return True


def current_session(prefix: str = "", quiet: bool = False) -> Session:
    return RayTrainSession(prefix) if in_ray_train_worker() else ConsoleSession(prefix, quiet)
