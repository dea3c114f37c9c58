"""What remem_ray relies on inside timm, in one place (checked against timm 1.0.31).

- A ViT `Block`'s children `norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2` and
  its forward, `x + drop_path1(ls1(attn(norm1(x))))` then `+ drop_path2(ls2(mlp(norm2(.))))`:
  MLP reweighting recomputes that forward with the MLP branch scaled.
- The MLP's last linear layer `mlp.fc2`: the expertness statistics hook its input (the hidden
  units' activity, also in timm's gated MLPs).
- `build_model_with_cfg` and `VisionTransformer`, public, to register small ViTs.
- `timm.models._hub.load_model_config_from_hf(repo)`: an HF-hub repo's pretrained cfg (the
  preprocessing `weights: hf-hub:...` were trained with).
- `timm.models._hub.save_config_for_hf(model, path, data_config=...)`: the config.json that
  `timm.create_model("local-dir:...")` reads (public `save_for_hf` also writes the weights, and
  needs huggingface_hub): exports write it (remem_ray/export.py).

tests/test_timm_adapter.py fails loudly when any of these moves in a new timm.
"""

from __future__ import annotations

from typing import Any, cast

from timm.models import VisionTransformer, build_model_with_cfg
from timm.models.vision_transformer import Block
from torch import nn

BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def is_plain_vit_block(module: nn.Module) -> bool:
    """A timm ViT Block whose forward is Block's own (pre-norm, two residual branches).

    Subclasses that change the forward (other residual layouts) are not plain: reweighting
    them with Block's formula would silently compute something else.
    """
    return isinstance(module, Block) and type(module).forward is Block.forward


def mlp_output_layer(block: nn.Module) -> nn.Module:
    """The last linear layer of a block's MLP (`mlp.fc2`), whose input is the hidden units'
    activity: act(fc1(x)) in timm's Mlp, act(gate) * value in its gated ones (GluMlp, SwiGLU,
    SwiGLUPacked, GatedMlp), where `mlp.act`'s output is the gate alone."""
    return cast(nn.Module, cast(nn.Module, block.mlp).fc2)


def hub_pretrained_cfg(repo: str) -> dict[str, Any]:
    """The pretrained cfg an HF-hub repo's config.json gives (its weights' mean, std, crop...),
    as `timm.create_model("hf-hub:REPO")` reads it (downloads config.json)."""
    from timm.models._hub import load_model_config_from_hf

    pretrained_cfg, _, _ = load_model_config_from_hf(repo)
    return dict(pretrained_cfg)


def build_vit(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """A VisionTransformer registered under `variant` (its default cfg from the registry)."""
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **kwargs)


def write_timm_config(
    model: nn.Module, path: str, data_config: dict[str, Any], label_names: list[str] | None = None
) -> None:
    """timm's config.json for `model` (architecture, args, classes and their names, preprocessing)
    at `path`; timm loads the names into the model's `pretrained_cfg["label_names"]`."""
    from timm.models._hub import save_config_for_hf

    model_config = {"label_names": list(label_names)} if label_names else None
    save_config_for_hf(model, path, model_config=model_config, data_config=data_config)
