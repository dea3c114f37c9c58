"""Guards for what remem_ray relies on inside timm (remem_ray/timm_adapter.py): each fails loudly
when a new timm moves it."""

from __future__ import annotations

import copy

import timm
import torch
from timm.models.vision_transformer import Block

from remem_ray.models import ReweightedBlock
from remem_ray.timm_adapter import BLOCK_CHILDREN, build_vit, is_plain_vit_block, mlp_output_layer


def _block() -> Block:
    torch.manual_seed(0)
    return Block(dim=16, num_heads=2).eval()


def test_a_vit_block_has_the_children_reweighting_reuses():
    block = _block()
    assert {name for name, _ in block.named_children()} == set(BLOCK_CHILDREN)
    assert is_plain_vit_block(block)


def test_blocks_forward_is_the_formula_reweighting_recomputes():
    """At alpha = 1 the reweighted forward is Block's own: if timm changes Block.forward, this breaks."""
    block, x = _block(), torch.randn(2, 5, 16)
    for mode in ("remem", "mlp"):
        torch.testing.assert_close(ReweightedBlock(copy.deepcopy(block), 1.0, mode)(x), block(x), rtol=0, atol=0)


def test_the_mlp_output_layers_input_is_the_hidden_layer():
    block, seen = _block(), []
    mlp_output_layer(block).register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape))
    block(torch.randn(2, 5, 16))
    assert seen == [torch.Size([2, 5, 4 * 16])]  # mlp_ratio 4


def test_public_builder_makes_the_registered_micro_vit():
    model = timm.create_model("vit_micro_patch4", num_classes=3)
    built = build_vit(
        "vit_micro_patch4",
        False,
        img_size=16,
        patch_size=4,
        embed_dim=96,
        depth=4,
        num_heads=3,
        class_token=False,
        global_pool="avg",
        num_classes=3,
    )
    assert type(model) is type(built) and list(model.state_dict()) == list(built.state_dict())
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)


def test_timm_still_writes_the_config_local_dir_loading_reads():
    import inspect

    from timm.models._hub import save_config_for_hf

    assert {"model", "config_path", "data_config"} <= set(inspect.signature(save_config_for_hf).parameters)
