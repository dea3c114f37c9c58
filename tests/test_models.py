import copy

import pytest
import timm
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS

from remem_ray.checkpoints import CheckpointError, load_model, model_meta, read_checkpoint, write_checkpoint
from remem_ray.errors import ResourceError
from remem_ray.models import ReweightedBlock, create_model, reweight_mlp, reweighting_of
from remem_ray.storage import Storage


def _vit(seed: int = 0, **extra):
    torch.manual_seed(seed)
    kwargs = {**TINY_VIT_KWARGS, **extra}
    return create_model(TINY_VIT, num_classes=5, img_size=16, kwargs=kwargs).eval()


def _images(n: int = 4):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["remem", "mlp"])
@pytest.mark.parametrize("extra", [{}, {"init_values": 1e-2}], ids=["plain", "layerscale"])
def test_alpha_one_is_identical_to_stock(mode, extra):
    stock = _vit(**extra)
    reweighted = reweight_mlp(copy.deepcopy(stock), alpha=1.0, mode=mode)
    x = _images()
    with torch.no_grad():
        assert torch.equal(stock(x), reweighted(x))


def _hand_block(block, x, alpha, mode):
    h = x + block.ls1(block.attn(block.norm1(x)))
    mlp = block.ls2(block.mlp(block.norm2(h)))
    return (2 - alpha) * h + alpha * mlp if mode == "remem" else h + alpha * mlp


@pytest.mark.parametrize("mode", ["remem", "mlp"])
def test_alpha_below_one_matches_hand_written_forward(mode):
    model = reweight_mlp(_vit(), alpha=0.7, mode=mode)
    x = _images()
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        expected = tokens
        for block in model.blocks:
            expected = _hand_block(block, expected, 0.7, mode)
        expected = model.forward_head(model.norm(expected))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), reweight_mlp(copy.deepcopy(model), 1.0)(x))


def test_reweighting_keeps_parameters_and_state_dict_keys():
    stock = _vit()
    reweighted = reweight_mlp(copy.deepcopy(stock), alpha=0.5)
    assert list(stock.state_dict()) == list(reweighted.state_dict())
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in reweighted.parameters())
    assert all(isinstance(b, ReweightedBlock) for b in reweighted.blocks)
    assert reweighting_of(reweighted) == {"alpha": 0.5, "mode": "remem"}
    assert reweighting_of(stock) is None


def test_non_vit_is_refused():
    with pytest.raises(TypeError, match="timm's Block"):
        reweight_mlp(timm.create_model("resnet10t", num_classes=3), alpha=0.9)


@pytest.mark.parametrize("alpha", [0.0, 1.5, -0.2])
def test_alpha_outside_range_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        reweight_mlp(_vit(), alpha=alpha)


def test_checkpoint_round_trip_keeps_reweighting(tmp_path):
    model = reweight_mlp(_vit(), alpha=0.6, mode="mlp")
    store = Storage(str(tmp_path))
    write_checkpoint(store, "ck", model, model_meta(model, TINY_VIT, TINY_VIT_KWARGS, 5, 16, epoch=3))
    loaded, meta = load_model(store, "ck")
    assert meta["reweighting"] == {"alpha": 0.6, "mode": "mlp"} and meta["epoch"] == 3
    x = _images()
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))


def test_corrupt_or_unfinished_checkpoint_refused(tmp_path):
    model = _vit()
    store = Storage(str(tmp_path))
    write_checkpoint(store, "ck", model, model_meta(model, TINY_VIT, TINY_VIT_KWARGS, 5, 16))
    blob = (tmp_path / "ck" / "model.pt").read_bytes()
    (tmp_path / "ck" / "model.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(store, "ck")
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        read_checkpoint(store, "ck")


def test_weights_from_local_file_load_body_and_new_head(tmp_path):
    source = create_model(TINY_VIT, num_classes=7, img_size=16, kwargs=TINY_VIT_KWARGS)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model(TINY_VIT, num_classes=5, img_size=16, kwargs=TINY_VIT_KWARGS, weights=str(path))
    assert torch.equal(loaded.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    assert loaded.head.out_features == 5


def test_weights_from_s3_are_fetched_once(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    source = create_model(TINY_VIT, num_classes=7, img_size=16, kwargs=TINY_VIT_KWARGS)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    s3["client"].upload_file(str(path), s3["bucket"], "models/w.pth")
    uri = f"s3://{s3['bucket']}/models/w.pth"
    loaded = create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=uri, endpoint=s3["endpoint"])
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    s3["client"].delete_object(Bucket=s3["bucket"], Key="models/w.pth")
    create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=uri, endpoint=s3["endpoint"])  # from cache


def test_unreachable_weights_name_the_field(tmp_path, s3):
    with pytest.raises(ResourceError, match=r"^teacher\.weights: file not found"):
        create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=str(tmp_path / "nope.pth"), role="teacher")
    with pytest.raises(ResourceError, match=r"^student\.weights: not found: s3://"):
        create_model(
            TINY_VIT,
            5,
            16,
            TINY_VIT_KWARGS,
            weights=f"s3://{s3['bucket']}/missing.pth",
            role="student",
            endpoint=s3["endpoint"],
        )
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ResourceError, match=r"^teacher\.weights: cannot load"):
        create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=str(tmp_path / "junk.pth"), role="teacher")


def test_rewriting_a_checkpoint_replaces_it_whole(tmp_path):
    store = Storage(str(tmp_path))
    first, second = _vit(seed=1), _vit(seed=2)
    write_checkpoint(store, "best", first, model_meta(first, TINY_VIT, TINY_VIT_KWARGS, 5, 16, epoch=1))
    write_checkpoint(store, "best", second, model_meta(second, TINY_VIT, TINY_VIT_KWARGS, 5, 16, epoch=2))
    loaded, meta = load_model(store, "best")
    assert meta["epoch"] == 2
    assert torch.equal(loaded.head.weight, second.head.weight)


def test_reweighted_blocks_hold_the_same_parameter_objects():
    """Optimiser state and DDP buckets refer to parameter objects: reweighting must keep them."""
    model = _vit()
    before = [id(p) for p in model.parameters()]
    reweight_mlp(model, alpha=0.7)
    assert [id(p) for p in model.parameters()] == before
    reweight_mlp(model, alpha=0.9, mode="mlp")  # again: alpha and mode replaced, nothing re-wrapped
    assert all(b.alpha == 0.9 and b.mode == "mlp" for b in model.blocks)
    assert not any(isinstance(m, ReweightedBlock) for b in model.blocks for m in b.children())


def test_a_block_subclass_with_its_own_forward_is_not_reweighted():
    """Reweighting recomputes Block's forward: a subclass that changes it would silently get another model."""
    from timm.models.vision_transformer import Block

    class PostNormBlock(Block):
        def forward(self, x, **kwargs):
            return self.norm1(x + self.attn(x))

    model = _vit()
    model.blocks[0] = PostNormBlock(dim=model.embed_dim, num_heads=2)
    reweight_mlp(model, alpha=0.5)
    assert isinstance(model.blocks[0], PostNormBlock) and isinstance(model.blocks[1], ReweightedBlock)


def test_a_hub_model_that_cannot_be_fetched_is_blamed_on_its_name(monkeypatch):
    """An hf-hub: name's config is fetched from the hub: offline, the failure named model_kwargs."""
    import timm

    from remem_ray.errors import SpecError
    from remem_ray.models import check_model_spec

    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SpecError, match=r"^student.model: hf-hub:org/repo cannot be built: We couldn't connect"):
        check_model_spec("student", "hf-hub:org/repo", {}, 10, 32)


def test_model_kwargs_repeating_the_datas_size_and_classes_build_as_without_them():
    """A stored spec that repeats data.img_size in model_kwargs still resumes and builds the same
    model; another size is refused (it used to replace data.img_size silently)."""
    from remem_ray.errors import SpecError
    from remem_ray.models import check_model_spec, create_model

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    check_model_spec("teacher", "vit_micro_patch4", {**kwargs, "img_size": 16, "num_classes": 4}, 4, 16)
    torch.manual_seed(0)
    repeated = create_model("vit_micro_patch4", 4, 16, {**kwargs, "img_size": 16, "num_classes": 4})
    torch.manual_seed(0)
    plain = create_model("vit_micro_patch4", 4, 16, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(repeated.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(SpecError, match=r"^teacher.model_kwargs.img_size: 32 where data.img_size gives 16;"):
        check_model_spec("teacher", "vit_micro_patch4", {**kwargs, "img_size": 32}, 4, 16)
    with pytest.raises(SpecError, match=r"^student.model_kwargs.pretrained: set by student.weights"):
        check_model_spec("student", "resnet10t", {"pretrained": True}, 4, 16)


def test_hf_hub_weights_are_normalised_as_their_repos_config_says_through_training_and_reload(tmp_path, monkeypatch):
    """`weights: hf-hub:ORG/REPO` only swapped the weights' address: the mean/std (and eval crop)
    were the model name's default tag's, so the weights saw inputs normalised otherwise. Then a
    checkpoint rebuilt from its name must keep what it was trained on (the targets' teacher)."""
    import timm.models._builder as builder
    import timm.models._hub as hub

    from remem_ray import models
    from remem_ray.models import normalizer_for, resolved_data_config

    repo_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 1.0, "interpolation": "bilinear"}
    asked: list[str] = []
    monkeypatch.setattr(
        hub, "load_model_config_from_hf", lambda repo: (asked.append(repo), (repo_cfg, TINY_VIT, {}))[1]
    )
    monkeypatch.setattr(builder, "load_pretrained", lambda model, **kw: None)  # no hub here: the weights as drawn
    models._hub_config.cache_clear()
    weights = "hf-hub:org/vit-tiny"
    model = create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=weights, role="teacher")
    assert tuple(normalizer_for(model).mean.flatten().tolist()) == pytest.approx(repo_cfg["mean"])
    assert tuple(normalizer_for(model).std.flatten().tolist()) == pytest.approx(repo_cfg["std"])
    stock = resolved_data_config(TINY_VIT, TINY_VIT_KWARGS, 16)
    config = resolved_data_config(TINY_VIT, TINY_VIT_KWARGS, 16, weights, "teacher")
    assert config["crop_pct"] == 1.0 and tuple(config["mean"]) == repo_cfg["mean"] != tuple(stock["mean"])
    assert asked == ["org/vit-tiny"]  # the repo's config read once
    store = Storage(str(tmp_path))
    write_checkpoint(store, "ck", model, model_meta(model, TINY_VIT, TINY_VIT_KWARGS, 5, 16))
    loaded, _ = load_model(store, "ck")
    assert tuple(normalizer_for(loaded).mean.flatten().tolist()) == pytest.approx(repo_cfg["mean"])

    def unreachable(repo):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(hub, "load_model_config_from_hf", unreachable)
    models._hub_config.cache_clear()
    with pytest.raises(ResourceError, match=r"^teacher\.weights: cannot read the config.json of hf-hub:org/vit-tiny: "):
        create_model(TINY_VIT, 5, 16, TINY_VIT_KWARGS, weights=weights, role="teacher")
    models._hub_config.cache_clear()
