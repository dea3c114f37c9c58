"""Training augmentation and eval resizing: what each dataset asks for, and its batched form.

`TrainAugment` and `EvalResize` describe a dataset's views once; the DataLoader path turns them
into torchvision transforms (per image, in worker processes), the device pipeline into the
batched tensor ops below (per batch, on the GPU, only uint8 crossing the bus).

Random parameters on the device come from a counter-based hash of (key, image index, draw),
not from a stateful generator: a sample's augmentation depends on its key and index only, never
on the batch it lands in, the rank that reads it or the device. Keys are (seed, epoch) for
training and (view seed, view) for the fixed views of cached teacher targets, so a resumed
epoch, another world size and the target cache all see the same pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27: products of 32-bit values stay exact in int64


@dataclass(frozen=True)
class TrainAugment:
    """A dataset's training views.

    translate: resize to img_size, shift by up to `pad` pixels each way (zero fill), the
    augmentation fit for small images; resized_crop: a random crop of `scale` of the area and
    `ratio` aspect, resized to img_size (torchvision's RandomResizedCrop). Both may flip.
    """

    img_size: int
    mode: Literal["translate", "resized_crop"]
    hflip: bool
    pad: int = 0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


# Bump when how a training view is drawn from its seed changes (draw order, constants, the crop
# arithmetic): caches of teacher targets key on it, and an old one would pair its logits with
# other pictures than the student sees, silently.
VIEWS_VERSION = 1


def views_identity(aug: TrainAugment) -> str:
    """What decides a training view besides its seed: part of the target caches' keys."""
    return f"views-v{VIEWS_VERSION}:{aug.mode},{aug.img_size},{aug.hflip},{aug.pad},{aug.scale},{aug.ratio}"


@dataclass(frozen=True)
class EvalResize:
    """A dataset's eval views: resize the short side to img_size / crop_pct, centre-crop img_size."""

    img_size: int
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    @classmethod
    def from_timm(cls, img_size: int, data_config: dict[str, Any]) -> EvalResize:
        """The eval crop a timm model's data config asks for, at img_size."""
        crop_pct = float(data_config.get("crop_pct") or 1.0)
        return cls(img_size, crop_pct, str(data_config.get("interpolation") or "bilinear"))

    @property
    def resized_side(self) -> int:
        """The short side before the centre crop; floored, as timm's eval transform does."""
        return max(self.img_size, math.floor(self.img_size / self.crop_pct))


def augment_for(img_size: int, hflip: bool) -> TrainAugment:
    """Small images get translations (a crop of a few pixels is most of them); larger ones resized crops."""
    if img_size <= 64:
        return TrainAugment(img_size, "translate", hflip, pad=max(1, img_size // 8))
    return TrainAugment(img_size, "resized_crop", hflip)


def eval_view_for(augment: TrainAugment, model_view: EvalResize) -> EvalResize:
    """The eval view that matches the training views: the model's timm crop where training crops
    and resizes (its crop_pct is the scale those views average), the whole image resized where
    training only translates (a 0.875 crop of a 32-px image would show objects 1/0.875 larger
    than any training view, as the in-memory datasets never did)."""
    if augment.mode == "translate":
        return EvalResize(augment.img_size, 1.0, model_view.interpolation)
    return model_view


# --------------------------------------------------------------------------- counter-based randomness


def mix32(x):
    """A 32-bit integer hash (works on Python ints and int64 tensors alike)."""
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def stream_key(*parts: int) -> int:
    """One 32-bit key from several integers (seed, epoch; or view seed, view)."""
    key = 0x9E3779B9
    for part in parts:
        key = mix32(key ^ (int(part) & _MASK32) ^ mix32((int(part) >> 32) & _MASK32))
    return key


def view_keys(view_seed: int, view: torch.Tensor) -> torch.Tensor:
    """The key of view v under a view seed: fixed views are the same pictures in every epoch."""
    return mix32((stream_key(view_seed) ^ (view.long() + 1)) & _MASK32)


def uniforms(keys: torch.Tensor, index: torch.Tensor, draws: int) -> torch.Tensor:
    """float32 [B, draws] in [0, 1): a pure function of (key, index, draw), exact on any device."""
    base = mix32((mix32(keys.long() & _MASK32) ^ (index.long() & _MASK32)) & _MASK32)
    draw = torch.arange(1, draws + 1, device=index.device, dtype=torch.long)
    bits = mix32(base[:, None] ^ mix32(draw * 0x27D4EB2F & _MASK32)[None, :])
    return (bits >> 8).float() * (1.0 / (1 << 24))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Boxes:
    """Per-sample crop boxes in stored pixels (top, left, height, width) and flips."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def translate_params(u: torch.Tensor, pad: int, hflip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx) in [0, 2 pad] (offsets into the zero-padded image) and flips, from 3 uniforms each."""
    span = 2 * pad + 1
    dy = (u[:, 0] * span).long().clamp_(max=span - 1)
    dx = (u[:, 1] * span).long().clamp_(max=span - 1)
    flip = (u[:, 2] < 0.5) if hflip else torch.zeros_like(dy, dtype=torch.bool)
    return dy, dx, flip


RESIZED_CROP_DRAWS = 41  # 10 attempts x (area, ratio, top, left) + flip


def resized_crop_params(
    u: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool
) -> Boxes:
    """torchvision's RandomResizedCrop.get_params, for a batch: 10 attempts, then a centre fallback."""
    area = height * width
    attempts = u[:, :40].view(-1, 10, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * attempts[..., 1])
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long))
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    top = (attempts[..., 2].gather(1, pick)[:, 0] * (height - h + 1).float()).long().clamp(min=0)
    left = (attempts[..., 3].gather(1, pick)[:, 0] * (width - w + 1).float()).long().clamp(min=0)
    top = torch.minimum(top, height - h)
    left = torch.minimum(left, width - w)
    fallback = first < 0  # applied unconditionally: testing it on the host would sync the device
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
    top = torch.where(fallback, (height - fh) // 2, top)
    left = torch.where(fallback, (width - fw) // 2, left)
    flip = (u[:, 40] < 0.5) if hflip else torch.zeros_like(top, dtype=torch.bool)
    return Boxes(top, left, h, w, flip)


# --------------------------------------------------------------------------- batched ops


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [0, 1]."""
    return images.float().mul_(1.0 / 255.0)


def resize(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Square resize; antialiased when shrinking (as PIL is), plain when growing."""
    if images.shape[-2:] == (size, size):
        return images
    mode = "bicubic" if mode == "bicubic" else "bilinear"
    shrink = images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=shrink)


def translate(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image by (dy - pad, dx - pad) pixels with zero fill (pad + crop, batched)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def crop_resize(images: torch.Tensor, boxes: Boxes, size: int) -> torch.Tensor:
    """Each box resized to size x size (bilinear sampling of the box, flipped where asked)."""
    _, _, height, width = images.shape
    sign = 1.0 - 2.0 * boxes.flip.float()
    theta = torch.zeros(len(boxes.top), 2, 3, device=images.device)
    theta[:, 0, 0] = boxes.width.float() / width * sign
    theta[:, 0, 2] = (2 * boxes.left + boxes.width).float() / width - 1.0
    theta[:, 1, 1] = boxes.height.float() / height
    theta[:, 1, 2] = (2 * boxes.top + boxes.height).float() / height - 1.0
    grid = F.affine_grid(theta, [len(theta), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_views(images: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, aug: TrainAugment) -> torch.Tensor:
    """uint8 stored images -> augmented float views in [0, 1], each a function of (key, index)."""
    x = to_unit(images)
    if aug.mode == "translate":
        dy, dx, flip = translate_params(uniforms(keys, index, 3), aug.pad, aug.hflip)
        x = flip_where(translate(resize(x, aug.img_size), dy, dx, aug.pad), flip)
    else:
        u = uniforms(keys, index, RESIZED_CROP_DRAWS)
        x = crop_resize(
            x, resized_crop_params(u, x.shape[-2], x.shape[-1], aug.scale, aug.ratio, aug.hflip), aug.img_size
        )
    return x.clamp_(0.0, 1.0)


def eval_views(images: torch.Tensor, view: EvalResize) -> torch.Tensor:
    """uint8 stored images -> resized, centre-cropped float views in [0, 1]."""
    resized = view.resized_side
    x = resize(to_unit(images), resized, view.interpolation)
    top = int(round((resized - view.img_size) / 2.0))  # torchvision's CenterCrop (the loader path's), not a floor
    return x[..., top : top + view.img_size, top : top + view.img_size].clamp_(0.0, 1.0)
