"""The epoch loop both trainings share: setup, resume, per-epoch eval and report.

A `Task` (teacher fine-tuning or student distillation) supplies the model, one training
epoch and what to save; `run_epochs` does the rest the same way for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remem_ray.config import RunSpec
from remem_ray.data import DataSplits, EvalTransformConfig, build_datasets
from remem_ray.storage import Storage
from remem_ray.train.common import (eval_loader, evaluate, loader_workers, pick_device, seed_everything, set_epoch,
                                    train_loader)
from remem_ray.train.session import Session, current_session


@dataclass
class LoopContext:
    spec: RunSpec
    session: Session
    device: torch.device
    output: Storage
    splits: DataSplits
    loaders: dict[str, torch.utils.data.DataLoader] = field(default_factory=dict)
    report_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_writer(self) -> bool:
        return self.session.world_rank == 0


def prepare(config: dict[str, Any], role: str) -> LoopContext:
    """Parse the spec, seed, pick the device and build this rank's loaders.

    role: "teacher" or "student", the spec section whose model and batch size apply.
    """
    from remem_ray.models import resolved_data_config

    spec = RunSpec.model_validate(config["spec"])
    section = getattr(spec, role)
    model_name, model_kwargs, batch_size = section.model, section.model_kwargs, section.batch_size
    session = current_session(prefix=f"{role}: ", quiet=bool(config.get("quiet", False)))
    seed_everything(spec.seed + 1000 * session.world_rank)
    device = pick_device(spec.device, session.local_rank)
    eval_cfg = EvalTransformConfig.from_timm(resolved_data_config(model_name, model_kwargs, spec.data.img_size))
    splits = build_datasets(spec.data, spec.seed, eval_cfg, endpoint=spec.storage.endpoint)
    workers = loader_workers(spec.data.num_workers, device)
    loaders = {
        "train": train_loader(splits.train, batch_size, spec.seed, workers, device),
        "val": eval_loader(splits.val, max(batch_size, 256), workers, device),
        "test": eval_loader(splits.test, max(batch_size, 256), workers, device),
    }
    output = Storage(config["output"], spec.storage.endpoint, spec.storage.region)
    return LoopContext(spec, session, device, output, splits, loaders, dict(config.get("report_extra") or {}))


class Task:
    """One training run's specifics; `run_epochs` drives it."""

    epochs: int
    model: nn.Module
    normalizer: nn.Module

    def train_epoch(self, ctx: LoopContext, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def after_epoch(self, ctx: LoopContext, epoch: int, metrics: dict[str, Any]) -> None:
        """Save what this task keeps (rank 0 writes)."""


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_epochs(ctx: LoopContext, task: Task) -> list[dict[str, Any]]:
    """Train from the last reported state (or the start), evaluating and reporting each epoch."""
    history: list[dict[str, Any]] = []
    start = 1
    state = ctx.session.restore_state()
    if state is not None:
        task.load_state(state["task"])
        history = list(state["history"])
        start = state["epoch"] + 1
        torch.set_rng_state(state["rng"])
        ctx.session.log(f"resuming at epoch {start} of {task.epochs}")
    for epoch in range(start, task.epochs + 1):
        began, began_at = time.perf_counter(), time.time()
        set_epoch(ctx.loaders["train"], epoch)
        metrics: dict[str, Any] = {"epoch": epoch, "epochs": task.epochs, "start_epoch": start,
                                   "epoch_started_at": began_at}
        metrics.update(task.train_epoch(ctx, epoch))
        for split in ("val", "test"):
            loss, acc = evaluate(task.model, task.normalizer, ctx.loaders[split], ctx.device)
            metrics[f"{split}_loss"], metrics[f"{split}_acc"] = loss, acc
        metrics["epoch_seconds"] = time.perf_counter() - began
        metrics["loop_seconds"] = sum(h["epoch_seconds"] for h in history) + metrics["epoch_seconds"]
        metrics["peak_rss_mb"] = peak_rss_mb()
        history.append(metrics)
        task.after_epoch(ctx, epoch, metrics)
        metrics.update(ctx.report_extra)
        state = {"epoch": epoch, "task": task.state(), "history": history, "rng": torch.get_rng_state()}
        ctx.session.report(metrics, state=state)
    return history
