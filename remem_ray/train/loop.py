"""The epoch loop both trainings share: setup, resume, per-epoch eval and report.

A `Task` (teacher fine-tuning or student distillation) supplies the model, its training
step and what to save; `run_epochs` does the rest the same way for both, timing each epoch's
training images per second and the share of it spent waiting for data.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from remem_ray.checkpoints import model_meta, write_checkpoint
from remem_ray.config import LEASE_STALE_AFTER_S, TEACHER_WAIT_TIMEOUT_S, RunSpec
from remem_ray.contract import EPOCH, EPOCHS, LoopConfig, Session
from remem_ray.data import DataPipeline, DataSplits, EvalResize, Shard, build_datasets, build_pipeline
from remem_ray.data.augment import stream_key
from remem_ray.errors import RecordedDivergence, ResourceError, TrainingDivergedError
from remem_ray.faultpoints import hold_if_asked
from remem_ray.leases import LeaseWatch
from remem_ray.models import create_model
from remem_ray.process import peak_rss_mb, process_started_at
from remem_ray.storage import Storage
from remem_ray.teacher_layout import RESUME_DIR
from remem_ray.train.common import (
    Meter,
    PerStepSchedule,
    compiles,
    eval_batch_size,
    evaluate,
    pick_device,
    rank0_decides,
    rank0_says,
    seed_everything,
    to_device,
)
from remem_ray.train.scalars import ScalarLog
from remem_ray.train.session import EpochLines, StoredStateSession, current_session

MODULE_IMPORTED_AT = time.time()  # in a Train worker: once its imports (torch, timm, ours) are done


@dataclass
class LoopContext:
    role: str  # "teacher" or "student"
    spec: RunSpec
    session: Session
    device: torch.device
    output: Storage
    splits: DataSplits
    data: DataPipeline
    eval_batches: dict[str, Iterable] = field(default_factory=dict)
    report_extra: dict[str, Any] = field(default_factory=dict)
    lease: LeaseWatch | None = None  # the right to write `output` (a teacher key's, a student key's holder)
    stopped: str | None = None  # why the loop stopped early, if it did
    scalars: ScalarLog | None = None  # TensorBoard events of this run (rank 0), where asked for
    started: dict[str, float] = field(default_factory=dict)  # when this run's process and loop began
    earlier_output: Storage | None = None  # an earlier run's output this one continues from (read only)
    on_finished: Callable[..., object] | None = None  # LoopConfig.on_finished, unpickled
    lease_stale_after_s: float = LEASE_STALE_AFTER_S  # LoopConfig's: for leases the loop takes itself
    wait_limit_s: float = TEACHER_WAIT_TIMEOUT_S

    @property
    def is_writer(self) -> bool:
        return self.session.world_rank == 0

    @property
    def output_shared(self) -> bool:
        """Whether others read `output` while this run writes it: a teacher key's folder (its
        complete checkpoints are kept as they are); a student's folder is its trial's own."""
        return self.lease is not None and self.role == "teacher"

    def create_model(self) -> nn.Module:
        """This role's model as its spec section names it (weights fetched if given), on the CPU.

        Its initial weights are a function of (seed, role) alone: it is built under a CPU generator
        of its own, so nothing drawn before (a dataset, a target cache built or loaded) moves them.
        """
        section = getattr(self.spec, self.role)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed(self.spec.seed, self.role))
            return create_model(
                section.model,
                self.splits.num_classes,
                self.spec.data.img_size,
                section.model_kwargs,
                weights=section.weights,
                role=self.role,
                endpoint=self.spec.storage.endpoint,
                region=self.spec.storage.region,
                weights_identity=section.weights_identity,
            )

    def lease_lost(self) -> str | None:
        """Why this run may no longer write its output (its lease passed on), or None; same on every rank."""
        if self.lease is None:
            return None
        reason = self.lease.lost() if self.is_writer else None
        if rank0_decides(reason is not None, self.device):
            return reason or "rank 0 found the lease lost"
        return None


def base_session(config: LoopConfig, role: str) -> Session:
    """The config's own Session (in-process callers, tests bring one), else the console's or, in a
    Ray Train worker, Train's; its lines start with the config's label, e.g. "trial 1a2b teacher 8e8b4b34"."""
    if config.session is not None:
        return config.session
    return current_session(prefix=f"{config.label or role}: ", quiet=config.quiet)


def prepare(config: LoopConfig, role: str) -> LoopContext:
    """Seed, pick the device and build this rank's data pipeline for the config's spec.

    role: "teacher" or "student", the spec section whose model and batch size apply.
    """
    from remem_ray.models import resolved_data_config

    # where a run's start goes: this process's birth (Ray's scheduling before it), the loop's
    # entry (imports and Train's setup before it), the first epoch (data and models before it)
    entered_at = time.time()
    spec = config.spec
    section = getattr(spec, role)
    model_name, model_kwargs, batch_size = section.model, section.model_kwargs, section.batch_size
    session = base_session(config, role)
    earlier = None
    if config.resume_from:  # an earlier run's, read only, until this run has a state of its own
        earlier = Storage(config.resume_from, spec.storage.endpoint, spec.storage.region)
    if config.state:  # the resume state kept in a folder of its own, not where the session keeps it
        stored = StoredStateSession(session, Storage(config.state, spec.storage.endpoint, spec.storage.region))
        if earlier is not None:
            stored.adopt(earlier.child(RESUME_DIR))
        session = stored
    seed_everything(rank_seed(spec.seed, session.world_rank, 0))
    device = pick_device(spec.device, session.local_rank)
    if device.type == "cuda":  # the CUDA context now, so a run's start shows what it costs
        torch.zeros(1, device=device)
        # cuDNN picks each convolution's fastest algorithm once per shape (training batches have
        # one shape: drop_last), as the GPU benchmarks always measured; GPU runs were never bitwise
        # deterministic (cuDNN's and atomics' backward kernels), so nothing promised is lost
        torch.backends.cudnn.benchmark = True
    device_ready_at = time.time()
    data_config = resolved_data_config(model_name, model_kwargs, spec.data.img_size, section.weights, role)
    splits = build_datasets(
        spec.data,
        spec.seed,
        EvalResize.from_timm(spec.data.img_size, data_config),
        endpoint=spec.storage.endpoint,
        region=spec.storage.region,
    )
    data = build_pipeline(
        spec.data, splits, device, spec.seed, Shard(session.world_rank, session.world_size), log=session.detail
    )
    session.detail(f"data: {data.describe()}; compile {'on' if compiles(spec.compile, device) else 'off'}")
    eval_batches = {split: data.eval(split, eval_batch_size(batch_size)) for split in ("val", "test")}
    data_ready_at = time.time()
    output = Storage(config.output, spec.storage.endpoint, spec.storage.region)
    scalars = None
    if config.tensorboard and session.world_rank == 0:
        scalars = ScalarLog(Storage(config.tensorboard, spec.storage.endpoint, spec.storage.region))
    started = {
        "process_started_at": process_started_at(),
        "module_imported_at": MODULE_IMPORTED_AT,
        "loop_entered_at": entered_at,
        "device_ready_at": device_ready_at,
        "data_ready_at": data_ready_at,
    }
    return LoopContext(
        role,
        spec,
        session,
        device,
        output,
        splits,
        data,
        eval_batches,
        dict(config.report_extra),
        LeaseWatch(config.lease) if config.lease is not None else None,
        scalars=scalars,
        started=started,
        earlier_output=earlier,
        on_finished=config.finished_hook(),
        lease_stale_after_s=config.lease_stale_after_s,
        wait_limit_s=config.wait_limit_s,
    )


class EpochClock:
    """Times one training epoch: images seen, seconds blocked waiting for the next batch, step marks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.images, self.wait, self.seconds = 0, 0.0, 0.0
        self.marks: list[float] = []

    def batches(self, loader: Iterable) -> Iterator:
        began = time.perf_counter()
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            got = time.perf_counter()
            self.wait += got - asked
            self.marks.append(got)
            self.images += len(batch[1])
            yield batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch ends when its kernels do
        self.seconds = time.perf_counter() - began

    def metrics(self, world_size: int) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "train_seconds": self.seconds,
            "images_per_s": self.images * world_size / seconds,
            "data_wait_share": min(1.0, self.wait / seconds),
        }

    def first_step_excess(self) -> float | None:
        """How much longer the first step took than a typical one (torch.compile's compile time)."""
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        if len(steps) < 2:
            return None
        return max(0.0, steps[0] - statistics.median(steps[1:]))


class Task:
    """One training run's specifics; `run_epochs` drives it.

    A task sets its model (the module the loop calls), the bare module it saves, normalizer,
    optimizer, per-step scheduler, whether inputs go channels_last, and its training batches;
    `step` is one optimisation step on a batch already on the device.
    """

    epochs: int
    model: nn.Module
    bare: nn.Module  # the module saved: model is it, or it wrapped in DDP / torch.compile
    normalizer: nn.Module
    scheduler: PerStepSchedule
    channels_last: bool = False
    train_batches: Any

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, extra: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of one optimisation step."""
        raise NotImplementedError

    def train_epoch(self, ctx: LoopContext, batches: Iterable) -> dict[str, float]:
        """The epoch's loss and accuracy, and `lr`: the rate its last step trained at (read after
        the scheduler's step, it was the next epoch's first: the last epoch showed the floor)."""
        self.model.train()
        meter = Meter()
        lr = float(self.scheduler.get_last_lr()[0])
        for images, labels, *extra in batches:
            images = to_device(images, ctx.device, self.channels_last)
            labels = labels.to(ctx.device, non_blocking=True)
            loss, logits = self.step(images, labels, extra)
            lr = float(self.scheduler.get_last_lr()[0])
            self.scheduler.step()
            meter.add(loss.detach(), logits.detach(), labels)
        train_loss, train_acc = meter.totals()
        return {"train_loss": train_loss, "train_acc": train_acc, "lr": lr}

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def begin(self, ctx: LoopContext, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """Before the first epoch: the state to resume from (the one restored, or None to start
        afresh; a task that cannot resume, because what it needs is gone, says why)."""
        return state

    def after_epoch(self, ctx: LoopContext, epoch: int, metrics: dict[str, Any]) -> None:
        """Save what this task keeps (rank 0 writes)."""

    def console_epochs(self) -> Collection[int]:
        """The epochs whose line always reaches a sweep's console (see EpochLines): all of them,
        unless a task's in-between epochs matter to nobody watching."""
        return range(1, self.epochs + 1)

    def save_model(self, ctx: LoopContext, name: str, epoch: int, metrics: dict[str, Any], **meta: Any) -> None:
        """Write the bare model as checkpoint `name` under the run's output, with what rebuilds it.
        A shared output (a teacher key's) keeps a complete checkpoint as it is: others read it."""
        section = getattr(ctx.spec, ctx.role)
        info = model_meta(
            self.bare,
            section.model,
            section.model_kwargs,
            ctx.splits.num_classes,
            ctx.spec.data.img_size,
            role=ctx.role,
            epoch=epoch,
            metrics=metrics,
            # how it was evaluated: what an export tells timm (remem_ray.export)
            eval_view=asdict(ctx.splits.eval_view),
            # what each output means, where the data names its classes (an export's label_names)
            class_names=list(ctx.splits.class_names) if ctx.splits.class_names else None,
            **meta,
        )
        write_checkpoint(ctx.output, name, self.bare, info, once=ctx.output_shared)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The RNG seed of one rank in one epoch (epoch 0: model building)."""
    return stream_key(seed, rank, epoch)


_ROLE_STREAMS = {"teacher": 0, "student": 1}


def model_seed(seed: int, role: str) -> int:
    """The seed a role's model is built under, the same on every rank (DDP starts from rank 0's
    anyway). The teacher's is the one rank 0 always built it under, so teachers stay as trained."""
    teacher = rank_seed(seed, 0, 0)
    return teacher if role == "teacher" else stream_key(teacher, _ROLE_STREAMS[role])


def _refuse_divergence(ctx: LoopContext, epoch: int, metrics: dict[str, Any]) -> None:
    """Stop before a diverged epoch is saved, reported or published: its NaN weights would pass
    for a chance-level model (argmax of NaN is class 0), and students would distil from them.
    The losses are totals over every rank, so every rank stops alike."""
    bad = {k: metrics[k] for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])}
    if bad:
        losses = ", ".join(f"{k} {v}" for k, v in bad.items())
        hint = f"{ctx.role}.optimizer.lr" + (" or teacher.rho" if ctx.role == "teacher" else "")
        raise TrainingDivergedError(
            f"{ctx.role} diverged in epoch {epoch} ({losses}); nothing of that epoch is kept: lower {hint}"
        )


@contextlib.contextmanager
def divergence_kept(hook: object | None, device: torch.device) -> Iterator[None]:
    """Around a training whose hook keeps divergences (a sweep's, on rank 0: `divergence()`,
    `diverged(message)`): one that diverged before stops on every rank before its first epoch (a
    divergence is seeded: a retry, another trial of the key, would only diverge again), and one that
    diverges now is recorded, every rank's error then naming the record. Ranks without the hook
    pass None and take rank 0's word."""
    recorded = rank0_says(getattr(hook, "divergence", lambda: None)(), device)
    if recorded is not None:
        raise RecordedDivergence(recorded)
    try:
        yield
    except TrainingDivergedError as exc:
        # every rank gets here in the same epoch (the losses are totals over every rank); the others
        # wait for rank 0's record: a rank that raised first would have Train end the group before
        # the record is written, and its error (the one a trial's failure line shows) not name it
        message, kept = rank0_says(_record_divergence(hook, str(exc)), device)
        if message is None:  # a hook that keeps nothing (or none at all)
            raise
        raise (RecordedDivergence if kept else TrainingDivergedError)(message) from exc


def _record_divergence(hook: object | None, message: str) -> tuple[str | None, bool]:
    """(the hook's record of the divergence: its message naming the record, or None if it keeps
    none; whether it was kept): a record that cannot be written leaves the divergence the error,
    saying so."""
    try:
        where = getattr(hook, "diverged", lambda message: None)(message)
        return where, where is not None
    except (ResourceError, OSError) as err:
        return f"{message} (not recorded: {err})", False


def run_epochs(ctx: LoopContext, task: Task) -> list[dict[str, Any]]:
    """Train from the last reported state (or the start), evaluating and reporting each epoch.

    Every rank reseeds its CPU and CUDA generators at each epoch from (seed, rank, epoch), and
    the pipelines draw order and views from (seed, epoch): a run resumed at epoch k + 1 goes on
    exactly as the uninterrupted one, with no RNG state to carry (or to get wrong per rank).
    """
    try:
        return _epochs(ctx, task)
    finally:  # a failed run's too (a stopped run's process is ended: the next ScalarLog sweeps it)
        if ctx.scalars is not None:
            ctx.scalars.close()


def _epochs(ctx: LoopContext, task: Task) -> list[dict[str, Any]]:
    ctx.started["task_built_at"] = time.time()  # its models built, teacher loaded, targets ready
    history: list[dict[str, Any]] = []
    start = 1
    state = task.begin(ctx, ctx.session.restore_state())
    if state is not None:
        task.load_state(state["task"])
        history = list(state["history"])
        start = state["epoch"] + 1
        if start > task.epochs:  # a run restarted after its last epoch (its result is handed over below)
            ctx.session.log(f"all {task.epochs} epochs were done already (its resume state says so)")
        else:
            ctx.session.log(f"resuming at epoch {start} of {task.epochs}")
        if start > task.epochs and history:
            # Finished before an interruption that lost the news (e.g. Tune had not saved the
            # trial's completion): report the final result again so whoever waits for it gets it.
            ctx.session.report({**history[-1], **ctx.report_extra, "replayed": 1})
    lines = EpochLines(start, task.epochs, task.console_epochs())
    for epoch in range(start, task.epochs + 1):
        began, began_at = time.perf_counter(), time.time()
        seed_everything(rank_seed(ctx.spec.seed, ctx.session.world_rank, epoch))
        task.train_batches.set_epoch(epoch)
        metrics: dict[str, Any] = {
            EPOCH: epoch,
            EPOCHS: task.epochs,
            "start_epoch": start,
            "epoch_started_at": began_at,
            **ctx.started,
        }
        clock = EpochClock(ctx.device)
        metrics.update(task.train_epoch(ctx, clock.batches(task.train_batches)))
        metrics.update(clock.metrics(ctx.session.world_size))
        if epoch == start and compiles(ctx.spec.compile, ctx.device):
            excess = clock.first_step_excess()
            if excess is not None:
                metrics["compile_seconds"] = excess
                ctx.session.detail(f"torch.compile: the first step took {excess:.1f} s longer than the others")
        evaluated = time.perf_counter()  # (evaluate ends in a host sync: its totals)
        for split in ("val", "test"):
            loss, acc = evaluate(task.model, task.normalizer, ctx.eval_batches[split], ctx.device)
            metrics[f"{split}_loss"], metrics[f"{split}_acc"] = loss, acc
        # a compiled model's first eval also compiles its eval-mode graph (grad mode is a guard)
        metrics["eval_seconds"] = time.perf_counter() - evaluated
        # the lease before the divergence: a holder whose lease passed on stops without an error
        # (Train would retry it), diverged or not; the new holder, resumed, may train on
        ctx.stopped = ctx.lease_lost()
        if ctx.stopped is not None:
            # declared stale (a long pause, a network blip): another holder resumes this run
            ctx.session.log(
                f"stopping before saving epoch {epoch}: the lease on {ctx.output.uri()} is lost "
                f"({ctx.stopped}); its new holder goes on"
            )
            break
        _refuse_divergence(ctx, epoch, metrics)
        metrics["epoch_seconds"] = time.perf_counter() - began
        metrics["loop_seconds"] = sum(h["epoch_seconds"] for h in history) + metrics["epoch_seconds"]
        metrics["peak_rss_mb"] = peak_rss_mb()
        if ctx.device.type == "cuda":  # what this run's allocator held of the card at its peak
            # (the CUDA context, a few hundred MiB per process, comes on top): sizes GPU shares
            metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_reserved(ctx.device) / 2**20
        if ctx.is_writer and ctx.lease is not None:  # the worst moment to pause: checked, not yet written
            hold_if_asked(f"{ctx.role}-checked", epoch, ctx.output.uri())
        history.append(metrics)
        task.after_epoch(ctx, epoch, metrics)
        metrics.update(ctx.report_extra)
        state = {"epoch": epoch, "task": task.state(), "history": history}
        if ctx.scalars is not None:  # before the report: a scheduler's stop may end the run inside it
            ctx.scalars.write(metrics)
        if epoch == task.epochs and ctx.is_writer and ctx.on_finished is not None:  # before it too
            ctx.on_finished(ctx.output, history, ctx.session.log)
        ctx.session.report(metrics, state=state, show=lines.show(epoch))
        if ctx.is_writer:
            hold_if_asked(ctx.role, epoch, ctx.output.uri())
    return history
