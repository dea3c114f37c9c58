"""Small models registered in timm's registry, so specs name them like any timm model.

`vit_micro_patch4` is the embedded default's teacher: a 4-block ViT for 16x16 inputs that
trains from scratch on a CPU in well under a minute. Real runs name real timm models.
"""

from timm.models import generate_default_cfgs, register_model

from remem_ray.timm_adapter import build_vit

default_cfgs = generate_default_cfgs(
    {
        "vit_micro_patch4.untrained": {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 16, 16),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)

# what timm alone does not know: a model exported for plain timm must not be one of these
REGISTERED_HERE = frozenset({"vit_micro_patch4"})


@register_model
def vit_micro_patch4(pretrained: bool = False, **kwargs):
    """ViT, 4 blocks of width 96, 3 heads, 4x4 patches, mean-pooled tokens (no class token)."""
    args = dict(img_size=16, patch_size=4, embed_dim=96, depth=4, num_heads=3, class_token=False, global_pool="avg")
    return build_vit("vit_micro_patch4", pretrained, **dict(args, **kwargs))
