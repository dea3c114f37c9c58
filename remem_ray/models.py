"""Teacher and student models by timm name, their weights, and ReMem's MLP reweighting."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError
from timm.models.vision_transformer import Block
from torch import nn

from remem_ray import timm_models  # noqa: F401  (registers the embedded default's ViT)
from remem_ray.errors import ResourceError, SpecError

ReweightMode = Literal["remem", "mlp"]


# --------------------------------------------------------------------------- building


def _create(name: str, num_classes: int, img_size: int, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """timm.create_model, passing img_size only to architectures that take it (ViTs do, CNNs don't)."""
    try:
        return timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs, **extra)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, num_classes=num_classes, **kwargs, **extra)


def check_model_spec(role: str, name: str, kwargs: dict[str, Any], num_classes: int, img_size: int,
                     reweight: bool) -> None:
    """Build the model on the meta device (no memory, no download) to validate a spec cheaply."""
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise SpecError(f"{role}.model: unknown timm model {name!r}")
    try:
        with torch.device("meta"):
            model = _create(name, num_classes, img_size, kwargs)
    except Exception as exc:  # timm raises many kinds for bad kwargs; all are spec errors here (cause kept for --debug)
        raise SpecError(f"{role}.model_kwargs: {name} cannot be built: {exc}".splitlines()[0]) from exc
    if reweight and not _reweightable_blocks(model):
        raise SpecError(
            f"{role}.alpha: MLP reweighting needs a ViT built from timm's Block; {name} has none (use alpha: 1)"
        )


def create_model(name: str, num_classes: int, img_size: int, kwargs: dict[str, Any] | None = None,
                 weights: str | None = None, role: str = "model", endpoint: str | None = None) -> nn.Module:
    """A timm model with a fresh head of `num_classes`; body weights from `weights` if given.

    weights: None (random init), 'timm' (the hub weights of the name's tag), 'hf-hub:ORG/REPO',
    a local file, or an s3:// URI fetched once into the local cache.
    """
    kwargs = dict(kwargs or {})
    if weights is None:
        return _create(name, num_classes, img_size, kwargs)
    if weights == "timm":
        overlay = None
    elif weights.startswith("hf-hub:"):
        overlay = dict(hf_hub_id=weights[len("hf-hub:"):])
    else:
        local = _local_weights_file(weights, role, endpoint)
        overlay = dict(file=str(local))
    try:
        extra = {"pretrained": True}
        if overlay:
            extra["pretrained_cfg_overlay"] = overlay
        return _create(name, num_classes, img_size, kwargs, **extra)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError, SafetensorError) as exc:
        # missing or unreadable files, hub errors (OSError), state-dict mismatches (RuntimeError),
        # truncated or foreign files: the one line says which weights; --debug shows the cause
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"{role}.weights: cannot load {weights!r} for {name}: {reason}") from exc


def _local_weights_file(weights: str, role: str, endpoint: str | None) -> Path:
    if weights.startswith("s3://"):
        from remem_ray.storage import fetch_to_cache

        return fetch_to_cache(weights, endpoint=endpoint, field=f"{role}.weights")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ResourceError(f"{role}.weights: file not found: {weights}")
    return path


# --------------------------------------------------------------------------- reweighting


class ReweightedBlock(Block):
    """timm's ViT Block with ReMem's reweighted residual.

    remem: h = x + attn_branch(x);  out = (2 - alpha) * h + alpha * mlp_branch(h)
    mlp:   h = x + attn_branch(x);  out = h + alpha * mlp_branch(h)
    Same parameters and state-dict keys as Block, so stock weights load unchanged.
    """

    remem_alpha: float = 1.0
    remem_mode: ReweightMode = "remem"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        h = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        mlp_out = self.drop_path2(self.ls2(self.mlp(self.norm2(h))))
        alpha = self.remem_alpha
        if self.remem_mode == "remem":
            return (2.0 - alpha) * h + alpha * mlp_out
        return h + alpha * mlp_out


_REWEIGHTED_CLASSES: dict[type, type] = {Block: ReweightedBlock}


def _reweighted_class(cls: type) -> type:
    """A ReweightedBlock flavour of a Block subclass, made once per class."""
    if cls not in _REWEIGHTED_CLASSES:
        _REWEIGHTED_CLASSES[cls] = type(f"Reweighted{cls.__name__}", (ReweightedBlock, cls), {})
    return _REWEIGHTED_CLASSES[cls]


def _reweightable_blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def reweight_mlp(model: nn.Module, alpha: float, mode: ReweightMode = "remem") -> nn.Module:
    """Apply ReMem's MLP reweighting in place to every timm ViT Block of `model`; returns it.

    The class of each block is swapped (no new parameters), so forward changes while weights,
    state-dict keys and optimiser state stay as they were. Calling it again replaces alpha.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if mode not in ("remem", "mlp"):
        raise ValueError(f"mode must be 'remem' or 'mlp', got {mode!r}")
    blocks = _reweightable_blocks(model)
    if not blocks:
        raise TypeError(
            f"reweight_mlp supports ViT-family models built from timm's Block; "
            f"{type(model).__name__} has none"
        )
    for block in blocks:
        if not isinstance(block, ReweightedBlock):
            block.__class__ = _reweighted_class(type(block))
        block.remem_alpha = float(alpha)
        block.remem_mode = mode
    model.remem_reweighting = {"alpha": float(alpha), "mode": mode}
    return model


def reweighting_of(model: nn.Module) -> dict[str, Any] | None:
    """The reweighting applied to `model` ({'alpha', 'mode'}) or None."""
    return getattr(model, "remem_reweighting", None)


# --------------------------------------------------------------------------- inputs


class InputNormalizer(nn.Module):
    """Per-model normalisation: datasets yield [0, 1] images, each model sees its own mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def data_config_of(model: nn.Module) -> dict[str, Any]:
    return timm.data.resolve_data_config({}, model=model)


def normalizer_for(model: nn.Module) -> InputNormalizer:
    cfg = data_config_of(model)
    return InputNormalizer(tuple(cfg["mean"]), tuple(cfg["std"]))


def resolved_data_config(name: str, kwargs: dict[str, Any], img_size: int) -> dict[str, Any]:
    """timm's data config (mean, std, crop_pct, interpolation) without building real weights."""
    with torch.device("meta"):
        return data_config_of(_create(name, 2, img_size, dict(kwargs)))
