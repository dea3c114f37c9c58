"""Teacher fine-tuning: MLP reweighting first, then SAM (or plain steps at rho = 0) with
warmup + cosine, eval each epoch, and a checkpoint at each listed epoch."""

from __future__ import annotations

import json
from typing import Any

import torch

from remem_ray.checkpoint_files import CheckpointError, checkpoint_name, copy_checkpoint, is_complete
from remem_ray.contract import TEACHER_MI, LoopConfig, headline_mi
from remem_ray.insight.information import MI_REFERENCE_TEMPERATURE, checkpoint_information
from remem_ray.models import normalizer_for, reweight_mlp
from remem_ray.teacher_layout import HISTORY_FILE, SPEC_FILE
from remem_ray.train.common import PerStepSchedule, build_sam, load_optimizer_state, rank0_decides, runnable_model
from remem_ray.train.loop import LoopContext, Task, prepare, run_epochs
from remem_ray.train.steps import sam_step


class TeacherTask(Task):
    def __init__(self, ctx: LoopContext) -> None:
        cfg = ctx.spec.teacher
        self.cfg, self.epochs = cfg, cfg.epochs
        model = ctx.create_model()
        if cfg.alpha < 1.0:
            reweight_mlp(model, cfg.alpha, cfg.reweight_mode)
        self.bare = model.to(ctx.device)
        self.model, self.channels_last = runnable_model(self.bare, ctx.device, ctx.spec.compile)
        self.normalizer = normalizer_for(self.bare).to(ctx.device)
        self.optimizer = build_sam(self.bare, cfg.optimizer, cfg.rho, cfg.adaptive, cfg.asam_eta)
        self.train_batches = ctx.data.train(cfg.batch_size)
        self.scheduler = PerStepSchedule(
            self.optimizer.base_optimizer, cfg.schedule, cfg.epochs, len(self.train_batches)
        )

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, extra: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sam_step(self.model, self.optimizer, self.normalizer(images), labels, self.cfg.grad_clip)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.bare.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def begin(self, ctx: LoopContext, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """Resume only with every checkpoint saved before the state's epoch in this run's output:
        those an earlier holder wrote are copied over (checked against their sha256). If one is
        gone or corrupt, the teacher trains again from its first epoch (never an endless resume
        of a run that cannot end whole)."""
        if state is None:
            return None
        problem = self._missing_checkpoints(ctx, state["epoch"]) if ctx.is_writer else None
        if rank0_decides(problem is not None, ctx.device):
            ctx.session.log(f"not resuming at epoch {state['epoch'] + 1}: {problem}; training from epoch 1")
            return None
        return state

    def _missing_checkpoints(self, ctx: LoopContext, done: int) -> str | None:
        try:
            for epoch in (e for e in self.cfg.saved_epochs if e <= done):
                name = checkpoint_name(epoch)
                if is_complete(ctx.output, name):
                    continue
                if ctx.earlier_output is None:
                    return f"{ctx.output.uri(name)} is missing"
                copy_checkpoint(ctx.earlier_output, ctx.output, name)
        # missing, unfinished or corrupt; storage that does not answer raises (Train retries the run, state kept)
        except CheckpointError as exc:
            return str(exc)
        return None

    def console_epochs(self) -> list[int]:
        return self.cfg.saved_epochs  # the checkpoints students distil from

    def after_epoch(self, ctx: LoopContext, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch in self.cfg.saved_epochs and ctx.is_writer:
            # MI of this checkpoint's targets on a fixed val subset, at the reference temperature
            # (see remem_ray.insight.information): never the KD temperature of whichever trial trained it
            information = checkpoint_information(
                self.bare, self.normalizer, ctx.splits.val, ctx.device, MI_REFERENCE_TEMPERATURE, seed=ctx.spec.seed
            )
            metrics[TEACHER_MI] = headline_mi(information)
            self.save_model(
                ctx,
                checkpoint_name(epoch),
                epoch,
                metrics,
                teacher_key=ctx.spec.teacher_key(ctx.session.world_size),
                information=information,
                mi_temperature=MI_REFERENCE_TEMPERATURE,
            )
            ctx.session.detail(f"saved checkpoint {ctx.output.uri(checkpoint_name(epoch))}")


def fine_tune_teacher(config: LoopConfig) -> dict[str, Any]:
    """Fine-tune the config's teacher, in-process or on each Ray Train worker.

    With a lease, stop (writing nothing more) once it is lost; with a `state` folder, keep the
    resume state there, for whoever trains this teacher next (remem_ray.train.phases).
    Writes <output>/spec.json and <output>/epoch_<e>/ for each saved epoch.
    """
    ctx = prepare(config, "teacher")
    task = TeacherTask(ctx)  # weights are fetched before anything is written
    if ctx.is_writer:
        record = {"teacher_key": ctx.spec.teacher_key(ctx.session.world_size), "spec": ctx.spec.model_dump(mode="json")}
        ctx.output.write_text(SPEC_FILE, json.dumps(record, indent=2))
    history = run_epochs(ctx, task)
    if ctx.stopped is not None:
        return {"history": history, "stopped": ctx.stopped}
    if ctx.is_writer:  # the whole curve, for reports and the sweep-overhead benchmark
        ctx.output.write_text(HISTORY_FILE, json.dumps(history, indent=1))
    return {"history": history, "checkpoints": {e: ctx.output.uri(checkpoint_name(e)) for e in task.cfg.saved_epochs}}
