"""Teacher and student models by timm name, their weights, and ReMem's MLP reweighting."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from remem_ray import timm_models  # noqa: F401  (registers the embedded default's ViT)
from remem_ray.config import weights_kind
from remem_ray.errors import ResourceError, SpecError
from remem_ray.timm_adapter import BLOCK_CHILDREN, is_plain_vit_block

ReweightMode = Literal["remem", "mlp"]


# --------------------------------------------------------------------------- building


def _create(name: str, num_classes: int, img_size: int, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """timm.create_model, passing img_size only to architectures that take it (ViTs do, CNNs don't).
    The data's classes and size are passed here: model_kwargs repeating them (`check_spec` refuses
    other values) are not passed twice."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size")}
    try:
        return timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs, **extra)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(name, num_classes=num_classes, **kwargs, **extra)


# model_kwargs the rest of the spec sets: given there too, timm's "multiple values" error made the
# build fall back without data.img_size, and the model came out at the kwarg's size. The same
# value as the data's is harmless (a stored spec with it still resumes); another is refused.
# num_classes None: the data's classes are known only once it is read (an image folder); the
# kwarg is not passed on, the data's count is.
def _set_elsewhere(role: str, kwargs: dict[str, Any], num_classes: int | None, img_size: int) -> None:
    checks: tuple[tuple[str, int | None, str], ...] = (
        ("img_size", img_size, "data.img_size"),
        ("num_classes", num_classes, "the data's classes"),
        ("in_chans", 3, "the data (3-channel RGB images)"),
    )
    for key, value, by in checks:
        if key in kwargs and value is not None and kwargs[key] != value:
            raise SpecError(f"{role}.model_kwargs.{key}: {kwargs[key]!r} where {by} gives {value}; remove it here")
    for key in ("pretrained", "pretrained_cfg_overlay"):
        if kwargs.get(key):
            raise SpecError(f"{role}.model_kwargs.{key}: set by {role}.weights; remove it here")


def check_model_spec(
    role: str,
    name: str,
    kwargs: dict[str, Any],
    num_classes: int | None,
    img_size: int,
    reweighted_by: str | None = None,
) -> None:
    """Build the model on the meta device (no memory, no download) to validate a spec cheaply.
    num_classes None: not known before the data is read (built with 10 here). reweighted_by: the
    field asking for MLP reweighting, which needs a ViT."""
    _set_elsewhere(role, kwargs, num_classes, img_size)
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise SpecError(f"{role}.model: unknown timm model {name!r}")
    try:
        with torch.device("meta"):
            model = _create(name, num_classes or 10, img_size, kwargs)
    except Exception as exc:  # timm raises many kinds for bad kwargs; all are spec errors here (cause kept for --debug)
        # a hub name's config comes from the hub (or its local cache): a failure there is the name's
        # and so is a tag timm does not know (resnet18.no_such_tag)
        field = (
            "model" if (name.startswith("hf-hub:") and not kwargs) or "pretrained tag" in str(exc) else "model_kwargs"
        )
        raise SpecError(f"{role}.{field}: {name} cannot be built: {exc}".splitlines()[0]) from exc
    _check_forward(role, name, model, img_size)
    if reweighted_by is not None and not vit_block_modules(model):
        use = "alpha: {values: [1.0]}" if reweighted_by.startswith("sweep.") else "alpha: 1"
        raise SpecError(
            f"{reweighted_by}: MLP reweighting (alpha < 1) needs a ViT built from timm's Block; {role}.model "
            f"{name} has none (use {use})"
        )


def _check_forward(role: str, name: str, model: nn.Module, img_size: int) -> None:
    """One forward pass on the meta device: images too small for the model (a ViT's patch, a
    CNN's downsampling) failed at the first batch of every run, in a traceback. An op without a
    meta kernel proves nothing: passed over."""
    try:
        with torch.device("meta"), torch.no_grad():
            model.eval()(torch.empty(2, 3, img_size, img_size))
    except NotImplementedError:
        return
    except Exception as exc:  # noqa: BLE001  shape errors come as several kinds
        if "meta" in str(exc).lower():
            return
        raise SpecError(
            f"data.img_size: {role}.model {name} cannot take {img_size}-px images: {exc}".splitlines()[0]
        ) from exc


def create_model(
    name: str,
    num_classes: int,
    img_size: int,
    kwargs: dict[str, Any] | None = None,
    weights: str | None = None,
    role: str = "model",
    endpoint: str | None = None,
    region: str | None = None,
    weights_identity: str | None = None,
) -> nn.Module:
    """A timm model with a fresh head of `num_classes`; body weights from `weights` if given.

    weights: None (random init), 'timm' (the hub weights of the name's tag), 'hf-hub:ORG/REPO',
    a local file, or an s3:// URI fetched once into the local cache (a copy per weights_identity).
    """
    kwargs = dict(kwargs or {})
    kind = weights_kind(weights)
    if weights is None or kind == "none":
        return _create(name, num_classes, img_size, kwargs)
    if kind == "timm":
        overlay = None
    elif kind == "hf-hub":
        overlay = dict(hf_hub_id=weights[len("hf-hub:") :], **hub_preprocessing(weights, role))
    else:
        local = _local_weights_file(weights, role, endpoint, region, weights_identity)
        overlay = dict(file=str(local))
    try:
        extra: dict[str, Any] = {"pretrained": True}
        if overlay:
            extra["pretrained_cfg_overlay"] = overlay
        return _create(name, num_classes, img_size, kwargs, **extra)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, EOFError, SafetensorError) as exc:
        # missing or unreadable files, hub errors (OSError), state-dict mismatches (RuntimeError),
        # truncated or foreign files: the one line says which weights; --debug shows the cause
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"{role}.weights: cannot load {weights!r} for {name}: {reason}") from exc


def _local_weights_file(
    weights: str, role: str, endpoint: str | None, region: str | None, identity: str | None
) -> Path:
    if weights_kind(weights) == "s3":
        from remem_ray.storage import fetch_to_cache

        return fetch_to_cache(weights, endpoint=endpoint, field=f"{role}.weights", region=region, identity=identity)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ResourceError(f"{role}.weights: file not found: {weights}")
    return path


# --------------------------------------------------------------------------- reweighting


REWEIGHTING_ATTR = "remem_reweighting"  # on the model: what reweight_mlp applied (saved in checkpoint meta)


class ReweightedBlock(nn.Module):
    """A timm ViT Block's own children under their own names, with ReMem's reweighted residual.

    remem: h = x + attn_branch(x);  out = (2 - alpha) * h + alpha * mlp_branch(h)
    mlp:   h = x + attn_branch(x);  out = h + alpha * mlp_branch(h)
    Same parameter objects and state-dict keys as the block it replaces, so stock weights load
    unchanged and optimiser state carries over.
    """

    norm1: nn.Module
    attn: nn.Module
    ls1: nn.Module
    drop_path1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    drop_path2: nn.Module

    def __init__(self, block: nn.Module, alpha: float, mode: ReweightMode) -> None:
        super().__init__()
        for name in BLOCK_CHILDREN:
            self.add_module(name, getattr(block, name))
        self.alpha, self.mode = float(alpha), mode
        self.train(block.training)

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        # attn_kwargs (attn_mask, is_causal in recent timm) go to the attention as Block passes them
        h = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kwargs)))
        mlp_out = self.drop_path2(self.ls2(self.mlp(self.norm2(h))))
        if self.mode == "remem":
            return (2.0 - self.alpha) * h + self.alpha * mlp_out
        return h + self.alpha * mlp_out


def vit_block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every ViT block of `model`, timm's own or already reweighted, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ReweightedBlock) or is_plain_vit_block(m)]


def reweight_mlp(model: nn.Module, alpha: float, mode: ReweightMode = "remem") -> nn.Module:
    """Apply ReMem's MLP reweighting in place to every timm ViT Block of `model`; returns it.

    Each block is replaced (`set_submodule`) by a ReweightedBlock holding the same children, so
    forward changes while weights, state-dict keys and optimiser state stay as they were.
    Calling it again replaces alpha.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if mode not in ("remem", "mlp"):
        raise ValueError(f"mode must be 'remem' or 'mlp', got {mode!r}")
    blocks = vit_block_modules(model)
    if not blocks:
        raise TypeError(
            f"reweight_mlp supports ViT-family models built from timm's Block; {type(model).__name__} has none"
        )
    for name, block in blocks:
        if isinstance(block, ReweightedBlock):
            block.alpha, block.mode = float(alpha), mode
        else:
            model.set_submodule(name, ReweightedBlock(block, alpha, mode))
    setattr(model, REWEIGHTING_ATTR, {"alpha": float(alpha), "mode": mode})
    return model


def reweighting_of(model: nn.Module) -> dict[str, Any] | None:
    """The reweighting applied to `model` ({'alpha', 'mode'}) or None."""
    return getattr(model, REWEIGHTING_ATTR, None)


# --------------------------------------------------------------------------- inputs


class InputNormalizer(nn.Module):
    """Per-model normalisation: datasets yield [0, 1] images, each model sees its own mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def data_config_of(model: nn.Module) -> dict[str, Any]:
    return timm.data.resolve_data_config({}, model=model)


def normalizer_for(model: nn.Module) -> InputNormalizer:
    cfg = data_config_of(model)
    return InputNormalizer(tuple(cfg["mean"]), tuple(cfg["std"]))


def resolved_data_config(
    name: str, kwargs: dict[str, Any], img_size: int, weights: str | None = None, role: str = "model"
) -> dict[str, Any]:
    """timm's data config (mean, std, crop_pct, interpolation) without building real weights;
    `hf-hub:` weights bring their repo's own."""
    overlay = hub_preprocessing(weights, role) if weights_kind(weights) == "hf-hub" else {}
    extra = {"pretrained_cfg_overlay": overlay} if overlay else {}
    with torch.device("meta"):
        return data_config_of(_create(name, 2, img_size, dict(kwargs), **extra))


# what an hf-hub repo's config.json says of its weights' inputs (not their size: data.img_size's)
HUB_PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


@functools.lru_cache(maxsize=16)
def _hub_config(repo: str) -> dict[str, Any]:
    from remem_ray.timm_adapter import hub_pretrained_cfg

    return hub_pretrained_cfg(repo)


def hub_preprocessing(weights: str | None, role: str = "model") -> dict[str, Any]:
    """The preprocessing `hf-hub:ORG/REPO` weights were trained with, from the repo's config.json.
    The model's name alone gave its default tag's (say mean 0.5 where the repo's is ImageNet's):
    the weights were fed inputs normalised otherwise, with no error."""
    assert weights is not None and weights.startswith("hf-hub:")
    try:
        config = _hub_config(weights[len("hf-hub:") :])
    except Exception as exc:  # the hub's errors: network, a missing repo or file, a config without a cfg
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"{role}.weights: cannot read the config.json of {weights}: {reason}") from None
    return {key: config[key] for key in HUB_PREPROCESSING if key in config}
