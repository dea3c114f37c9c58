"""Student distillation from a teacher checkpoint. The teacher is frozen in eval mode with its
reweighting; its targets come online for each augmented batch or from a per-checkpoint cache
(see remem_ray.train.targets)."""

from __future__ import annotations

from typing import Any

import torch

from remem_ray.checkpoint_files import (
    BEST_POINTER,
    CheckpointError,
    best_checkpoint,
    best_name,
    is_best_name,
    is_complete,
    point_best,
)
from remem_ray.checkpoints import load_model, split_location
from remem_ray.contract import BEST_TEST_ACC, BEST_VAL_ACC, TEACHER_MI, TEACHER_VAL_ACC, LoopConfig, teacher_mi_of
from remem_ray.data import Views
from remem_ray.errors import SpecError
from remem_ray.losses import DistillationLoss
from remem_ray.models import normalizer_for
from remem_ray.train.common import PerStepSchedule, build_optimizer, load_optimizer_state, runnable_model
from remem_ray.train.loop import LoopContext, Task, divergence_kept, prepare, run_epochs
from remem_ray.train.steps import distillation_step
from remem_ray.train.targets import CachedTargets, OnlineTargets, TargetSource, load_or_build_targets


def target_source(ctx: LoopContext, teacher_location: str, teacher, teacher_normalizer) -> TargetSource:
    cfg = ctx.spec.student
    if cfg.teacher_targets == "online":
        return OnlineTargets(teacher, teacher_normalizer, ctx.device)
    table, info = load_or_build_targets(
        ctx.spec,
        teacher_location,
        teacher,
        teacher_normalizer,
        ctx.data,
        ctx.is_writer,
        log=ctx.session.log,
        stale_after_s=ctx.lease_stale_after_s,
        wait_limit_s=ctx.wait_limit_s,
    )
    ctx.report_extra["target_cache_built"] = int(info["built"])
    if not info["built"]:
        ctx.session.detail(f"teacher targets from cache {info['location']}")
    return CachedTargets(table, Views(cfg.target_views, cfg.target_view_seed), ctx.device)


def load_teacher(ctx: LoopContext, location: str, teacher_now=None) -> tuple[Any, dict[str, Any], str]:
    """(model, meta, location) of the teacher checkpoint, sha256-checked. One that fails its check
    is given up for where `teacher_now()` says the teacher is now (a registry publishes a retrained
    set beside a broken one), so a retried run reads the repaired set instead of failing again on
    the broken one; with nowhere else to go, the error stands (the run fails or is retried)."""
    storage, name = split_location(location, ctx.spec.storage.endpoint, ctx.spec.storage.region)
    try:
        model, meta = load_model(storage, name)
        return model, meta, location
    except CheckpointError as exc:
        moved = teacher_now() if teacher_now is not None else None
        if moved is None or moved.rstrip("/") == location.rstrip("/"):
            raise
        ctx.session.log(f"teacher checkpoint {location} is not usable ({exc}); distilling from {moved}, its set now")
    storage, name = split_location(moved, ctx.spec.storage.endpoint, ctx.spec.storage.region)
    model, meta = load_model(storage, name)
    return model, meta, moved


class StudentTask(Task):
    def __init__(self, ctx: LoopContext, teacher_location: str, teacher_now=None) -> None:
        cfg = ctx.spec.student
        self.cfg, self.epochs = cfg, cfg.epochs
        teacher, self.teacher_meta, teacher_location = load_teacher(ctx, teacher_location, teacher_now)
        if self.teacher_meta["num_classes"] != ctx.splits.num_classes:
            raise SpecError(
                f"student.teacher_checkpoint: teacher has {self.teacher_meta['num_classes']} classes, "
                f"data has {ctx.splits.num_classes}"
            )
        teacher = teacher.to(ctx.device).eval().requires_grad_(False)
        self.targets = target_source(ctx, teacher_location, teacher, normalizer_for(teacher).to(ctx.device))
        self.train_batches = ctx.data.train(cfg.batch_size, views=self.targets.views)
        student = ctx.create_model()
        self.bare = student.to(ctx.device)
        self.model, self.channels_last = runnable_model(self.bare, ctx.device, ctx.spec.compile)
        self.normalizer = normalizer_for(self.bare).to(ctx.device)
        self.loss_fn = DistillationLoss(cfg.kd.loss, cfg.kd.temperature, cfg.kd.weight)
        self.optimizer = build_optimizer(self.bare, cfg.optimizer)
        self.scheduler = PerStepSchedule(self.optimizer, cfg.schedule, cfg.epochs, len(self.train_batches))
        self.best_val_acc = -1.0
        self.best: dict[str, Any] = {}

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, extra: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One distillation step: teacher targets (online or cached) for the batch, CE + KD."""
        teacher_logits = self.targets(images, extra)
        return distillation_step(
            self.model, self.optimizer, self.loss_fn, self.normalizer(images), labels, teacher_logits
        )

    def state(self) -> dict[str, Any]:
        return {
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            BEST_VAL_ACC: self.best_val_acc,
            "best": self.best,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.bare.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_val_acc, self.best = state[BEST_VAL_ACC], state["best"]

    def begin(self, ctx: LoopContext, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """Readers follow the pointer to this state's best (or, starting afresh, to none), never to
        one an interrupted attempt wrote later, which this run may write again."""
        if ctx.is_writer:
            best = state["task"]["best"] if state is not None else None
            if best and is_complete(ctx.output, best_name(best["epoch"])):
                point_best(ctx.output, best["epoch"])
            elif ctx.output.is_file(BEST_POINTER):
                ctx.output.delete_file(BEST_POINTER)
        return state

    def after_epoch(self, ctx: LoopContext, epoch: int, metrics: dict[str, Any]) -> None:
        """Keep the student with the best val accuracy (test is reported beside it, never used).

        Each best is a folder of its own, written, then pointed at: whoever reads the best student
        (`sweep best`, the report, an export) follows the pointer to a finished folder that this
        run does not write again. The one pointed at before stays, for a reader that had just
        followed the pointer; older ones go.
        """
        if metrics["val_acc"] > self.best_val_acc:
            self.best_val_acc = metrics["val_acc"]
            self.best = {"epoch": epoch, "val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"]}
            if ctx.is_writer:
                self.save_model(ctx, best_name(epoch), epoch, metrics, teacher=self.teacher_meta)
                before = point_best(ctx.output, epoch)
                for name in ctx.output.list_dir():
                    if is_best_name(name) and name not in (best_name(epoch), before):
                        ctx.output.delete_dir(name)
        metrics[BEST_VAL_ACC] = self.best["val_acc"]
        metrics[BEST_TEST_ACC] = self.best["test_acc"]
        teacher_metrics = self.teacher_meta.get("metrics", {})
        metrics[TEACHER_VAL_ACC] = teacher_metrics.get("val_acc", float("nan"))
        metrics[TEACHER_MI] = teacher_mi_of(self.teacher_meta)


def distill_student(config: LoopConfig) -> dict[str, Any]:
    """Distil the config's student from its teacher checkpoint, in-process or on each Ray Train
    worker. Writes <output>/best_epoch_<e>/ and <output>/best.json, which points at the best."""
    ctx = prepare(config, "student")
    teacher = config.teacher_checkpoint or ctx.spec.student.teacher_checkpoint
    if not teacher:
        raise SpecError("student.teacher_checkpoint: no teacher checkpoint given")
    # a sweep's on_finished keeps its key's divergence: before the teacher is loaded and targets built
    with divergence_kept(ctx.on_finished if ctx.is_writer else None, ctx.device):
        task = StudentTask(ctx, teacher, config.teacher_finder())
        history = run_epochs(ctx, task)
    return {"history": history, "best": task.best, "checkpoint": best_checkpoint(ctx.output)}
