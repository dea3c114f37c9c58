import copy

import pytest
import torch
from torch import nn

from remem_ray.sam import SAM, weights_by_name


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_matches_closed_form(adaptive):
    model = _model()
    x, y = _batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
    _loss(model, x, y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.detach().clone() for p in model.parameters()]
    # one global norm over all parameters; ASAM scales by T_w = |w|
    tg = [wi.abs() * gi if adaptive else gi for wi, gi in zip(w, g)]
    norm = torch.sqrt(sum((t**2).sum() for t in tg))
    expected = [wi + 0.3 * ((wi**2) * gi if adaptive else gi) / norm for wi, gi in zip(w, g)]
    opt.first_step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    # the perturbation really has length rho (in the T_w^-1 metric for ASAM)
    e_w = [p.detach() - wi for p, wi in zip(model.parameters(), w)]
    scaled = [ei / wi.abs() if adaptive else ei for ei, wi in zip(e_w, w)]
    assert float(torch.sqrt(sum((s**2).sum() for s in scaled))) == pytest.approx(0.3, rel=1e-4)


def test_asam_with_eta_is_kwon_et_al_reference_form():
    """T_w = |w| + eta on the parameters named weight, a norm's 1-D weight included (Kwon et al.'s
    asam.py: `if 'weight' in n`), 1 on the others (biases). Failed before: 1 on every 1-D tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))
    x, y = _batch()
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=0.3, adaptive=True, eta=0.01, scaled=weights_by_name(model), lr=0.1
    )
    _loss(model, x, y).backward()
    names = [name for name, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.detach().clone() for p in model.parameters()]
    t = [wi.abs() + 0.01 if "weight" in name else torch.ones_like(wi) for name, wi in zip(names, w)]
    assert names[2] == "1.weight" and w[2].ndim == 1  # the norm's weight: scaled
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    expected = [wi + 0.3 * ti**2 * gi / norm for wi, ti, gi in zip(w, t, g)]
    opt.first_step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="eta"):
        SAM(model.parameters(), torch.optim.SGD, eta=-1.0, lr=0.1)


def test_second_step_restores_weights_and_steps_on_perturbed_gradient():
    model = _model()
    x, y = _batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
    w = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    g_adv = [p.grad.detach().clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    for p, wi, gi in zip(model.parameters(), w, g_adv):
        torch.testing.assert_close(p.detach(), wi - 0.5 * gi, rtol=0, atol=1e-7)
        assert p.grad is None


def test_step_with_closure_equals_two_step_form():
    a, b = _model(), _model()
    x, y = _batch()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        _loss(a, x, y).backward()
        opt_a.first_step(zero_grad=True)
        _loss(a, x, y).backward()
        opt_a.second_step(zero_grad=True)

        _loss(b, x, y).backward()

        def closure():
            loss = _loss(b, x, y)
            loss.backward()
            return loss

        opt_b.step(closure)
        opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    ],
)
def test_rho_zero_is_exactly_the_base_optimizer(base, kwargs):
    a = _model()
    b = copy.deepcopy(a)
    x, y = _batch()
    sam = SAM(a.parameters(), base, rho=0.0, **kwargs)
    plain = base(b.parameters(), **kwargs)
    assert not sam.needs_second_pass
    forward_backward = 0
    for _ in range(4):
        _loss(a, x, y).backward()
        forward_backward += 1
        sam.first_step()  # no-op at rho 0
        sam.second_step(zero_grad=True)
        _loss(b, x, y).backward()
        plain.step()
        plain.zero_grad()
    assert forward_backward == 4
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_scheduler_on_base_optimizer_drives_sam_lr():
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    x, y = _batch()
    w = [p.detach().clone() for p in model.parameters()]
    sched.step()  # lr 0.5 from now on
    assert opt.param_groups[0]["lr"] == 0.5
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]
    opt.second_step()
    for p, wi, gi in zip(model.parameters(), w, g):
        torch.testing.assert_close(p.detach(), wi - 0.5 * gi, rtol=0, atol=1e-7)


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x, y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_keeps_base_state():
    model = _model()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    x, y = _batch()
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    opt.second_step(zero_grad=True)
    clone = SAM(_model().parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    clone.load_state_dict(opt.state_dict())
    assert clone.base_optimizer.state_dict()["state"][0]["step"] == 1
    assert clone.param_groups is clone.base_optimizer.param_groups


def test_negative_rho_refused():
    with pytest.raises(ValueError, match="rho"):
        SAM(_model().parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from remem_ray.train.common import no_sync

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(_model())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = _batch(seed=10 + rank)  # each rank sees its own shard
    for _ in range(2):
        with no_sync(model):
            _loss(model, x, y).backward()
        local = [p.grad.clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
    torch.save({"params": [p.detach() for p in model.parameters()], "first_grad": local}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ddp_first_pass_local_second_pass_synced(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    # the first pass is not all-reduced (ranks ascend on their own gradients) ...
    assert not all(torch.equal(a, b) for a, b in zip(r0["first_grad"], r1["first_grad"]))
    # ... while the step uses the synchronised second-pass gradient, so replicas stay identical
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BatchNorm's cumulative average
def test_sams_second_pass_leaves_batchnorm_statistics_as_the_first_pass_left_them(momentum):
    """Both passes run in train mode: BatchNorm's running statistics took the batch twice, the
    second time at the perturbed weights (w + e, far from w at ReMem's rho), and those statistics
    are what the teacher is evaluated, measured and distilled with. A CNN teacher takes SAM
    (`sam_only.yaml`). Failed before: num_batches_tracked 2, running_mean twice moved."""
    from remem_ray.train.steps import sam_step

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    bn = model[1]
    once = copy.deepcopy(model)
    once(x)  # one train-mode forward at w: what the step's statistics should be
    sam_step(model, SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0), x, y)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, once[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, once[1].running_var, rtol=0, atol=0)


def test_the_teachers_sam_scales_the_named_weights_of_a_vit_and_nothing_else():
    import timm

    from remem_ray.config import OptimizerConfig
    from remem_ray.train.common import build_sam

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    opt = build_sam(model, OptimizerConfig(), rho=0.1, adaptive=True, eta=0.01)
    scaled = {name for name, p in model.named_parameters() if opt._is_scaled(p)}
    assert "blocks.0.norm1.weight" in scaled and "blocks.0.attn.qkv.weight" in scaled
    assert not scaled & {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "head.bias"}


def test_sams_two_passes_draw_the_same_dropout_masks():
    """The ascent direction came from one dropout mask and the descent gradient from another: two
    different nets (a ViT fine-tuned with `drop_path_rate`, as is common, would meet this)."""
    from remem_ray.train.steps import sam_step

    class Masks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop, self.seen = nn.Dropout(0.5), []

        def forward(self, x):
            out = self.drop(x)
            self.seen.append(out.detach() != 0)
            return out

    torch.manual_seed(0)
    masks = Masks()
    model = nn.Sequential(nn.Linear(6, 16), masks, nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    sam_step(model, SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), x, y)
    sam_step(model, SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1), x, y)
    first, second, third, fourth = masks.seen
    assert torch.equal(first, second) and torch.equal(third, fourth)
    assert not torch.equal(first, third)  # the next step draws anew
