"""Sharpness-Aware Minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

Usage, the two-pass form:

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)      # w <- w + e(w)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)     # w <- w - e(w), then the base optimiser steps

or `opt.step(closure)` where the closure runs forward and backward. With rho = 0 there is
no perturbation: `first_step` is a no-op, `needs_second_pass` is False, and `step` is the
base optimiser's step on the gradient already computed (one forward-backward per step).

Schedulers work on either object: SAM shares the base optimiser's param_groups.

Under DDP, run the first backward inside `model.no_sync()`: each worker ascends along its
own local gradient (the per-worker "m-sharpness" of the SAM paper, and no all-reduce spent
on a gradient that is thrown away); the second backward synchronises as usual, so the
base optimiser steps on the averaged gradient at the perturbed point. The loops do this.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import cast

import torch


class SAM(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        eta: float = 0.0,
        scaled: Collection[torch.Tensor] | None = None,
        **base_kwargs,
    ) -> None:
        """eta (ASAM only): 0 scales every tensor by T_w = |w| (pytorch-optimizer's form); eta > 0 is
        Kwon et al.'s reference: T_w = |w| + eta for the tensors in `scaled` (the reference: those
        whose name holds "weight", norms' included: `weights_by_name`), 1 for the others (biases,
        position embeddings). Without `scaled`, the tensors of more than one dimension."""
        if rho < 0.0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps
        self._scaled = {id(p) for p in scaled} if scaled is not None else None
        self._saved: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._buffers: dict[int, tuple[tuple[int, ...], list[torch.Tensor]]] = {}

    @property
    def needs_second_pass(self) -> bool:
        return any(group["rho"] > 0.0 for group in self.param_groups)

    def _params_with_grad(self, group) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    @staticmethod
    def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of parameters known to have one (from _params_with_grad)."""
        return [cast(torch.Tensor, p.grad) for p in params]

    def _scales(
        self, group, params: list[torch.Tensor], values: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """ASAM's T_w per tensor (see __init__), of `values` (copies of w) where given."""
        values = params if values is None else values
        eta = group.get("eta", 0.0)
        if eta == 0.0:
            return list(torch._foreach_abs([w.float() for w in values]))
        return [
            w.float().abs().add_(eta) if self._is_scaled(p) else torch.ones_like(w, dtype=torch.float32)
            for p, w in zip(params, values)
        ]

    def _is_scaled(self, p: torch.Tensor) -> bool:
        return id(p) in self._scaled if self._scaled is not None else p.ndim > 1

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """One global norm over all parameters: ||g||, or ||T_w g|| when adaptive."""
        norms: list[torch.Tensor] = []
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            grads = [g.float() for g in self._grads(params)]
            if group["adaptive"]:
                grads = list(torch._foreach_mul(grads, self._scales(group, params)))
            norms.extend(torch._foreach_norm(grads))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    def _backup_buffers(self, index: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Empty per-group buffers that first_step copies w into (second_step copies it back); kept
        across steps: allocating them every step costs more than holding them."""
        key = tuple(id(p) for p in params)
        cached = self._buffers.get(index)
        if cached is None or cached[0] != key:
            cached = (key, [torch.empty_like(p) for p in params])
            self._buffers[index] = cached
        return cached[1]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Ascend to w + e(w), e(w) = rho * g / ||g|| (ASAM: rho * T_w^2 g / ||T_w g||)."""
        self._saved = None
        if not self.needs_second_pass:
            if zero_grad:
                self.zero_grad()
            return
        norm = self.grad_norm()
        saved = []
        for index, group in enumerate(self.param_groups):
            params = self._params_with_grad(group)
            if not params or group["rho"] == 0.0:
                continue
            scale = group["rho"] / (norm + self.eps)
            originals = self._backup_buffers(index, params)
            torch._foreach_copy_(originals, params)
            grads = self._grads(params)
            scale = scale.to(grads[0].device, grads[0].dtype)
            if zero_grad:  # the gradients are dropped after this: scale them in place, no new tensors
                perturb = grads
                torch._foreach_mul_(perturb, scale)
            else:
                perturb = list(torch._foreach_mul(grads, scale))
            if group["adaptive"]:
                scales = self._scales(group, params, values=originals)
                squares = [t.to(p.dtype) for t, p in zip(torch._foreach_mul(scales, scales), perturb)]
                torch._foreach_mul_(perturb, squares)
            torch._foreach_add_(params, perturb)
            saved.append((params, originals))
        self._saved = saved
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w exactly (restored, not subtracted) and step the base optimiser."""
        for params, originals in self._saved or []:
            torch._foreach_copy_(params, originals)
        self._saved = None
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        # (the closure returns the loss tensor of the second pass, not a float)
        """Gradients of the first pass must already be computed; the closure recomputes them at w + e."""
        if not self.needs_second_pass:
            return self.base_optimizer.step()
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward and backward (or use first/second_step)")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def weights_by_name(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors Kwon et al.'s ASAM reference scales when eta > 0: those named "...weight"."""
    return [p for name, p in model.named_parameters() if "weight" in name]
