"""One optimisation step per task, shared by the training loops and the benchmarks (so what is
measured is what runs). Inputs arrive normalised and on the device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from remem_ray.train.common import autocast, no_sync


def _cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(images.device):
        logits = model(images)
    return F.cross_entropy(logits.float(), labels), logits


@contextlib.contextmanager
def _batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm's running statistics as they are now, whatever the forwards inside do to them
    (a ViT has none: nothing to keep)."""
    kept = [
        buffer
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in kept]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(kept, saved):
                buffer.copy_(value)


class _RandomDraws:
    """The random generators' state now (the CPU's, and the device's), to draw the same again:
    SAM's second pass must see the dropout and drop-path masks its first pass saw, or its ascent
    direction (from the first) and descent gradient (from the second) are of two different nets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def again(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def sam_step(
    model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor, grad_clip: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's step: SAM's two passes (the first without DDP's all-reduce: only the second
    pass's gradients are averaged; only the first updates BatchNorm's statistics; both draw the
    same dropout and drop-path masks), clipping the
    second; a plain step when no second pass is needed (rho = 0). `optimizer` is a SAM (or
    anything with its first_step/second_step/needs_second_pass)."""
    if optimizer.needs_second_pass:
        draws = _RandomDraws(images.device)
        with no_sync(model):
            loss, logits = _cross_entropy(model, images, labels)
            loss.backward()
        optimizer.first_step(zero_grad=True)
        # at w + e: only its gradients count, not the batch statistics it sees (the first pass's, at w, do)
        draws.again()
        with _batchnorm_statistics_kept(model):
            _cross_entropy(model, images, labels)[0].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.second_step(zero_grad=True)
        return loss, logits
    loss, logits = _cross_entropy(model, images, labels)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss, logits


def distillation_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's step: CE + distillation against the teacher's logits for this batch."""
    with autocast(images.device):
        logits = model(images)
    loss = loss_fn(logits, teacher_logits, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, logits
