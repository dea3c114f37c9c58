"""Pieces both loops share: device, precision, DDP and compile wrapping, optimiser and schedule, evaluation."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from remem_ray.config import OptimizerConfig, ScheduleConfig
from remem_ray.errors import ResourceError
from remem_ray.sam import SAM, weights_by_name

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """CUDA when available (one device per local rank), else CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ResourceError("device: cuda requested but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def eval_batch_size(train_batch_size: int) -> int:
    """Eval keeps no gradients, so it takes larger batches than training (at least 256)."""
    return max(train_batch_size, 256)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag on every rank, so all ranks take the same branch (and meet at the same collectives)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def rank0_says(value: T, device: torch.device) -> T:
    """Rank 0's value (anything picklable) on every rank (a collective: every rank calls it at the
    same point)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: nn.Module):
    """Skip DDP's all-reduce for one backward (SAM's first pass); a no-op without DDP."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """CNNs on CUDA run faster in NHWC (tensor-core convolutions); a ViT's one patch conv does not care."""
    return device.type == "cuda" and sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def compiles(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """`compile: auto` means on CUDA (kernels fuse, steps get faster) and off on CPU (compiling costs more)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def runnable_model(
    model: nn.Module, device: torch.device, compile_model: bool | Literal["auto"]
) -> tuple[nn.Module, bool]:
    """(the module the loop calls, whether inputs go channels_last) for a model already on `device`.

    DDP-wrapped when distributed, then compiled if asked (the order PyTorch recommends);
    `model` itself stays the bare module whose state dict is saved.
    """
    channels_last = prefers_channels_last(model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = wrap_distributed(model, device)
    if compiles(compile_model, device):
        wrapped = cast(nn.Module, torch.compile(wrapped))  # an OptimizedModule: still an nn.Module
    return wrapped, channels_last


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Non-blocking copy (from pinned memory on CUDA), NHWC where the model prefers it."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class Meter:
    """Running sums of loss, correct and count, kept on the device (no sync per batch) and
    all-reduced across ranks on read."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [loss x n, correct], float64 on the logits' device
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.numel()
        batch = torch.stack([loss.double() * n, (logits.argmax(-1) == labels).sum().double()])
        self.sums = batch if self.sums is None else self.sums + batch
        self.count += n

    def totals(self) -> tuple[float, float]:
        sums = torch.zeros(3, dtype=torch.float64, device=self.sums.device if self.sums is not None else None)
        if self.sums is not None:
            sums[:2] = self.sums
        sums[2] = self.count
        if is_distributed():
            # NCCL reduces on a CUDA device (the model's), gloo on the CPU
            sums = (
                sums.to(torch.device("cuda") if sums.device.type != "cuda" else sums.device)
                if dist.get_backend() == "nccl"
                else sums.cpu()
            )
            dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return loss / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, normalizer: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, float]:
    """(mean CE loss, accuracy) over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    meter = Meter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device):
            logits = model(normalizer(images))
        meter.add(F.cross_entropy(logits.float(), labels), logits, labels)
    model.train(was_training)
    return meter.totals()


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's and DeiT's recipe: no weight decay on biases, norms and other 1-D tensors, nor on what
    the model lists in `no_weight_decay()` (a ViT's position embedding and class token)."""
    from timm.optim import param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", None)
    skip = no_decay() if callable(no_decay) else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


# torch optimisers whose update runs as one fused kernel on CPU and CUDA alike (`fused=True`)
FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICES = {"cpu", "cuda"}


def fuses(optimizer_cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> bool:
    """Whether the update runs fused: one kernel for all tensors instead of several per tensor.
    On CPU AdamW's step over resnet10t takes 10 ms instead of 62 (SGD 3 instead of 12), more than
    the forward pass at small images; on CUDA it launches one kernel where foreach launches many."""
    cls = getattr(optimizer_cls, "func", optimizer_cls)  # timm names some as partials (sgd: nesterov)
    devices = {p.device.type for p in model.parameters()}
    return isinstance(cls, type) and issubclass(cls, FUSABLE) and devices <= FUSED_DEVICES


def _optimizer_kwargs(
    cfg: OptimizerConfig, optimizer_cls: Callable[..., torch.optim.Optimizer], model: nn.Module
) -> dict:
    from timm.optim import get_optimizer_info

    kwargs: dict = {"lr": cfg.lr}
    if get_optimizer_info(cfg.name).has_momentum:
        kwargs["momentum"] = cfg.momentum
    if fuses(optimizer_cls, model):
        kwargs["fused"] = True
    return kwargs


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping how this optimiser updates: torch takes each
    group's settings from the saved state, so a state saved unfused (before updates were fused, or
    on a device without fused kernels) would turn the fused update off for the rest of the run."""
    groups = [
        {**saved, "fused": now["fused"]} if "fused" in now else saved
        for saved, now in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """timm's optimiser by name over the bare model's parameters (the same tensors DDP and compile
    wrap), fused where torch has it. Call it once the model is on its device."""
    from timm.optim import get_optimizer_class

    cls = get_optimizer_class(cfg.name)
    return cls(decay_groups(model, cfg.weight_decay), **_optimizer_kwargs(cfg, cls, model))


def build_sam(model: nn.Module, cfg: OptimizerConfig, rho: float, adaptive: bool, eta: float = 0.0) -> SAM:
    from timm.optim import get_optimizer_class

    cls = get_optimizer_class(cfg.name)
    return SAM(
        decay_groups(model, cfg.weight_decay),
        cls,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        scaled=weights_by_name(model),
        **_optimizer_kwargs(cfg, cls, model),
    )


class PerStepSchedule:
    """timm's CosineLRScheduler (with warmup) stepped once per batch, in torch's LRScheduler manner.

    The loops call step() after each optimiser step and save state_dict() in checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int):
        from timm.scheduler import CosineLRScheduler

        total = max(1, epochs * steps_per_epoch)
        warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
        base_lr = optimizer.param_groups[0]["lr"]
        self.updates = 0
        self.timm = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total - warmup),
            lr_min=cfg.min_lr_ratio * base_lr,
            warmup_t=warmup,
            warmup_lr_init=base_lr / (warmup + 1),  # the first step already trains at a small, non-zero lr
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.timm.step_update(0)

    def step(self) -> None:
        self.updates += 1
        self.timm.step_update(self.updates)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.timm.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "timm": self.timm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.timm.load_state_dict(state["timm"])
        self.timm.step_update(self.updates)
