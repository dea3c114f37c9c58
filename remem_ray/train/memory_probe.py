"""How much device memory one Train run of a role takes: a few training steps of its model at its
batch size, on random inputs, measured by the CUDA caching allocator. What a share of a GPU is
sized from (remem_ray.sweep.gpu_shares); knows nothing of Ray.

The steps are the loops' own (train/steps.py) with the optimizer's state allocated (the first
step creates it), SAM's second pass taken, the reweighted blocks in place where the sweep
reweights, for an online-target student the frozen teacher's forward pass, then one eval batch
(larger than a training batch) with the optimizer's state still held, and the teacher's
full-precision MI pass; a student on cached targets first runs its teacher over a batch of views. The model runs eager:
compiling costs a minute, and eager keeps the larger set of activations, so the figure errs
high. Beside it, what the run keeps resident: the data pipeline's store and cached targets.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from remem_ray.config import RunSpec
from remem_ray.contract import StepMemory
from remem_ray.data import DataSplits, build_datasets, device_store_bytes, num_items
from remem_ray.insight.information import LOGITS_BATCH
from remem_ray.losses import DistillationLoss
from remem_ray.models import create_model, normalizer_for, reweight_mlp
from remem_ray.train.common import autocast, build_optimizer, build_sam, eval_batch_size, pick_device, runnable_model
from remem_ray.train.steps import distillation_step, sam_step
from remem_ray.train.targets import TARGETS_BATCH

PROBE_STEPS = 3
PROBE_RHO = 0.05  # any rho above 0 takes SAM's second pass and allocates its perturbation
MB = 2**20


def _images(spec: RunSpec, batch: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    size = spec.data.img_size
    images = torch.rand(batch, 3, size, size, device=device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _model(spec: RunSpec, role: str, device: torch.device) -> tuple[torch.nn.Module, bool]:
    section = getattr(spec, role)
    # the architecture only: weights change no memory, and fetching them would cost the probe minutes
    model = create_model(section.model, spec.data.num_classes, spec.data.img_size, section.model_kwargs).to(device)
    return runnable_model(model, device, compile_model=False)  # eager: see the module's docstring


def _teacher_forward(spec: RunSpec, device: torch.device, batch: int) -> Callable[[], torch.Tensor]:
    """The frozen teacher's forward over a batch, as OnlineTargets and compute_targets run it."""
    teacher, channels_last = _model(spec, "teacher", device)
    teacher.eval().requires_grad_(False)
    normalizer = normalizer_for(teacher).to(device)
    images = _images(spec, batch, device, channels_last)

    def forward() -> torch.Tensor:
        with torch.no_grad(), autocast(device):
            return teacher(normalizer(images)).float()

    return forward


def role_steps(
    spec: RunSpec, role: str, device: torch.device, reweight: bool = False
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step of `role` as its loop takes it, one eval batch as its loop evaluates:
    for the teacher also the full-precision pass that measures a checkpoint's MI), each ready to
    call repeatedly. A student on cached targets first builds a batch of them."""
    section = getattr(spec, role)
    batch, labels_max = section.batch_size, spec.data.num_classes
    if role == "student" and section.teacher_targets == "cached":
        # the run builds its targets first; the teacher goes before the student arrives (StudentTask)
        _teacher_forward(spec, device, TARGETS_BATCH)()
    model, channels_last = _model(spec, role, device)
    normalizer = normalizer_for(model).to(device)
    labels = torch.randint(0, labels_max, (batch,), device=device)
    images = _images(spec, batch, device, channels_last)
    eval_images = _images(spec, eval_batch_size(batch), device, channels_last)

    def eval_pass() -> None:
        model.eval()
        with torch.no_grad(), autocast(device):
            model(normalizer(eval_images))
        model.train()

    if role == "teacher":
        if reweight or section.alpha < 1.0:
            reweight_mlp(model, min(section.alpha, 0.9), section.reweight_mode)
        sam = build_sam(model, section.optimizer, max(section.rho, PROBE_RHO), section.adaptive, section.asam_eta)
        mi_images = _images(spec, LOGITS_BATCH, device, channels_last)

        def teacher_step() -> None:
            sam_step(model, sam, normalizer(images), labels, section.grad_clip)

        def teacher_evals() -> None:
            eval_pass()
            model.eval()
            with torch.no_grad():  # collect_logits: no autocast
                model(normalizer(mi_images))
            model.train()

        return teacher_step, teacher_evals
    optimizer = build_optimizer(model, section.optimizer)
    loss_fn = DistillationLoss(section.kd.loss, section.kd.temperature, section.kd.weight)
    if section.teacher_targets == "online":
        targets = _teacher_forward(spec, device, batch)
    else:
        cached = torch.randn(batch, labels_max, device=device)

        def targets() -> torch.Tensor:
            return cached

    def student_step() -> None:
        distillation_step(model, optimizer, loss_fn, normalizer(images), labels, targets())

    return student_step, eval_pass


def resident_mb(spec: RunSpec, role: str, splits: DataSplits, device: torch.device) -> float:
    """What a run of `role` keeps on the device beside its steps: the device pipeline's store
    (as build_pipeline decides it) and, for a student on cached targets, the targets' table
    (train images x views x classes, float16: remem_ray.train.targets)."""
    size = device_store_bytes(spec.data, splits, device)
    if role == "student" and spec.student.teacher_targets == "cached" and device.type == "cuda":
        size += num_items(splits.train) * spec.student.target_views * splits.num_classes * 2
    return size / MB


def measure_step_memory(spec: RunSpec, roles: list[str], reweight: bool = False) -> list[StepMemory]:
    """Each role's Train-run memory on this process's device, one role after the other. The data
    is listed as a run lists it, for its sizes and classes (a dataset on S3 is fetched into the
    node's cache, where the runs find it)."""
    device = pick_device(spec.device)
    on_cuda = device.type == "cuda"
    splits = build_datasets(spec.data, spec.seed, endpoint=spec.storage.endpoint, region=spec.storage.region)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"num_classes": splits.num_classes})})
    out = []
    for role in roles:
        gc.collect()  # the previous role's model and optimizer go before this role's arrive
        if on_cuda:
            torch.backends.cudnn.benchmark = True  # as the loop runs (its workspaces count)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step, eval_pass = role_steps(spec, role, device, reweight)
        for _ in range(PROBE_STEPS):
            step()
        eval_pass()  # with the optimizer's state still held, as between a loop's epochs
        del step, eval_pass
        resident = resident_mb(spec, role, splits, device)
        if not on_cuda:
            out.append(StepMemory(role, str(device), None, None, resident))
            continue
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_reserved(device) / MB
        total = torch.cuda.get_device_properties(device).total_memory / MB
        out.append(StepMemory(role, torch.cuda.get_device_name(device), peak, total, resident))
    return out
