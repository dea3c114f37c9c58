"""Model checkpoints: write and load the folders remem_ray.checkpoint_files describes.

An unfinished or corrupt folder is refused on load rather than used. meta.json records what
is needed to rebuild the model, the MLP reweighting included, so a reloaded teacher computes
what it computed in training.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch import nn

from remem_ray.checkpoint_files import (  # re-exported: the checkpoint API in one place
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    checkpoint_name,
    is_complete,
    read_checkpoint_files,
    split_location,
    verify_checkpoint,
    write_checkpoint_files,
)
from remem_ray.models import create_model, data_config_of, reweight_mlp, reweighting_of
from remem_ray.storage import Storage

__all__ = [
    "MANIFEST_FILE",
    "META_FILE",
    "MODEL_FILE",
    "CheckpointError",
    "checkpoint_name",
    "is_complete",
    "load_model",
    "model_meta",
    "read_checkpoint",
    "read_checkpoint_files",
    "split_location",
    "verify_checkpoint",
    "write_checkpoint",
]


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # under DDP
    return inner if isinstance(inner, nn.Module) else model


def model_meta(
    model: nn.Module, name: str, kwargs: dict[str, Any], num_classes: int, img_size: int, **extra: Any
) -> dict[str, Any]:
    normalization = data_config_of(_unwrap(model))  # what the model's InputNormalizer applied
    return {
        "model": name,
        "model_kwargs": kwargs,
        "num_classes": num_classes,
        "img_size": img_size,
        "reweighting": reweighting_of(_unwrap(model)),
        "mean": list(normalization["mean"]),
        "std": list(normalization["std"]),
        **extra,
    }


def write_checkpoint(storage: Storage, rel: str, model: nn.Module, meta: dict[str, Any], once: bool = False) -> None:
    """Data first, manifest last: readers trust a folder only once its manifest exists.

    once: a complete checkpoint there is kept as it is (written once, read by others meanwhile).
    """
    if once and is_complete(storage, rel):
        return
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}, buf)
    files = {MODEL_FILE: buf.getvalue(), META_FILE: json.dumps(meta, indent=2, sort_keys=True).encode()}
    write_checkpoint_files(storage, rel, files)


def read_checkpoint(storage: Storage, rel: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) after checking every file against the manifest."""
    blobs = read_checkpoint_files(storage, rel)
    state = torch.load(io.BytesIO(blobs[MODEL_FILE]), map_location="cpu", weights_only=True)
    return state, json.loads(blobs[META_FILE])


def load_model(storage: Storage, rel: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, reweighting included, and load its weights."""
    state, meta = read_checkpoint(storage, rel)
    model = create_model(meta["model"], meta["num_classes"], meta["img_size"], meta["model_kwargs"])
    if meta.get("mean") and meta.get("std"):  # what it was trained on (hf-hub weights bring their own)
        trained_on = {**getattr(model, "pretrained_cfg", {}), "mean": tuple(meta["mean"]), "std": tuple(meta["std"])}
        setattr(model, "pretrained_cfg", trained_on)  # noqa: B010  (timm's attribute; nn.Module's typing says Tensor)
    if meta.get("reweighting"):
        reweight_mlp(model, meta["reweighting"]["alpha"], meta["reweighting"]["mode"])
    model.load_state_dict(state)
    return model, meta
