"""Step-time ratios on one model and batch, CPU or GPU:

- SAM step / base optimiser step (target <= 2.05x; 2x is the floor: two forward-backward passes);
- our foreach SAM / a plain per-parameter-loop SAM (target: no slower, <= 1.0x);
- distillation step with cached targets / student-only step (target <= 1.15x), with the
  online-teacher step beside them for scale.

    python -m benchmarks.steps [--rounds 15]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import interleaved_samples, machine, median_ratio, medians, ratio_quartiles, table, verdict
from remem_ray.losses import DistillationLoss
from remem_ray.models import create_model
from remem_ray.sam import SAM
from remem_ray.train.steps import distillation_step, sam_step


class LoopSAM:
    """The textbook SAM, one Python iteration per parameter (the reference we must not lose to)."""

    needs_second_pass = True

    def __init__(self, params, rho: float, **kwargs) -> None:
        self.params = [p for p in params]
        self.base = torch.optim.AdamW(self.params, **kwargs)
        self.rho, self.e_w = rho, {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in self.params if p.grad is not None]), 2)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            e = p.grad * scale
            p.add_(e)
            self.e_w[p] = e
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        for p, e in self.e_w.items():
            p.sub_(e)
        self.base.step()
        self.base.zero_grad(set_to_none=True)


def sam_variants(model_name: str, batch: int, img: int, device: torch.device):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {k: create_model(model_name, 10, img).to(device).train() for k in ("base", "sam", "loop")}
    opts = {  # rho = 0: the teacher's step takes the base optimiser's plain path
        "base": SAM(models["base"].parameters(), torch.optim.AdamW, rho=0.0, lr=1e-4),
        "sam": SAM(models["sam"].parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4),
        "loop": LoopSAM(models["loop"].parameters(), rho=0.05, lr=1e-4),
    }

    def teacher_step(name):
        def step():  # the production step function (train/steps.py), as the default recipe (no clipping)
            sam_step(models[name], opts[name], x, y)

        return step

    return {
        "base step": teacher_step("base"),
        "SAM (foreach)": teacher_step("sam"),
        "SAM (per-parameter loop)": teacher_step("loop"),
    }


def distill_variants(teacher_name: str, student_name: str, batch: int, img: int, device: torch.device):
    from remem_ray.data import Views
    from remem_ray.train.targets import CachedTargets, OnlineTargets

    torch.manual_seed(0)
    x = torch.rand(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    teacher = create_model(teacher_name, 10, img).to(device).eval().requires_grad_(False)
    students = {k: create_model(student_name, 10, img).to(device).train() for k in ("ce", "online", "cached")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in students.items()}
    kd = DistillationLoss("kd", 4.0, 0.9)
    n_images, n_views = 4096, 8
    table_ = torch.randn(n_images, n_views, 10).half()  # float16, moved to the device, as in training
    sources = {
        "online": OnlineTargets(teacher, torch.nn.Identity(), device),
        "cached": CachedTargets(table_, Views(n_views, 0), device),
    }
    index, view = torch.randint(0, n_images, (batch,)), torch.randint(0, n_views, (batch,))

    def student_only():  # the reference: a plain CE step, no teacher
        F.cross_entropy(students["ce"](x), y).backward()
        opts["ce"].step()
        opts["ce"].zero_grad(set_to_none=True)

    def distil(name):
        def step():  # the production step function (train/steps.py)
            distillation_step(students[name], opts[name], kd, x, y, sources[name](x, [index, view]))

        return step

    return {
        "student only (CE)": student_only,
        "distil, cached targets": distil("cached"),
        "distil, online teacher": distil("online"),
    }


def optimizer_variants(student_name: str, batch: int, img: int, device: torch.device):
    """The student's CE step with the optimiser the loops build (build_optimizer: fused where torch
    has it) and with the same timm optimiser and parameter groups in torch's default implementation."""
    from timm.optim import get_optimizer_class

    from remem_ray.config import OptimizerConfig
    from remem_ray.train.common import build_optimizer, decay_groups

    torch.manual_seed(0)
    x = torch.rand(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cfg = OptimizerConfig()  # the default: adamw
    students = {k: create_model(student_name, 10, img).to(device).train() for k in ("built", "default")}
    opts = {
        "built": build_optimizer(students["built"], cfg),
        "default": get_optimizer_class(cfg.name)(decay_groups(students["default"], cfg.weight_decay), lr=cfg.lr),
    }
    assert opts["built"].defaults.get("fused") and not opts["default"].defaults.get("fused")

    def step(name):
        def run():
            F.cross_entropy(students[name](x), y).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

        return run

    return {f"{cfg.name}, fused (as built)": step("built"), f"{cfg.name}, torch default": step("default")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sam-model", default="vit_tiny_patch16_224")
    parser.add_argument("--teacher", default="vit_small_patch16_224")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=64)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(machine())

    sam = interleaved_samples(sam_variants(args.sam_model, args.batch, args.img, device), args.rounds)
    dist = interleaved_samples(distill_variants(args.teacher, args.student, args.batch, args.img, device), args.rounds)
    fused = interleaved_samples(optimizer_variants(args.student, args.batch, args.img, device), args.rounds)
    built, default = list(fused)
    pairs = {
        "sam": (sam, "SAM (foreach)", "base step"),
        "loop": (sam, "SAM (foreach)", "SAM (per-parameter loop)"),
        "cached": (dist, "distil, cached targets", "student only (CE)"),
        "online": (dist, "distil, online teacher", "student only (CE)"),
        "fused": (fused, built, default),
    }
    ratios = {k: median_ratio(*v) for k, v in pairs.items()}
    spread = {k: "{:.3f}-{:.3f}".format(*ratio_quartiles(*v)) for k, v in pairs.items()}
    rows = [
        ["measure", "ratio (median)", "quartiles", "target", "verdict"],
        [
            f"SAM step / AdamW step ({args.sam_model}, batch {args.batch}, {args.img}px)",
            f"{ratios['sam']:.3f}",
            spread["sam"],
            "<= 2.05",
            verdict(ratios["sam"], 2.05),
        ],
        [
            "SAM foreach / SAM per-parameter loop",
            f"{ratios['loop']:.3f}",
            spread["loop"],
            "<= 1.00",
            verdict(ratios["loop"], 1.0),
        ],
        [
            f"distil step, cached targets / student only ({args.student})",
            f"{ratios['cached']:.3f}",
            spread["cached"],
            "<= 1.15",
            verdict(ratios["cached"], 1.15),
        ],
        [
            f"distil step, online teacher ({args.teacher}) / student only",
            f"{ratios['online']:.3f}",
            spread["online"],
            "-",
            "for scale",
        ],
        [
            f"student step ({args.student}), fused AdamW / torch's default AdamW",
            f"{ratios['fused']:.3f}",
            spread["fused"],
            "< 1.00",
            verdict(ratios["fused"], 0.999),
        ],
    ]
    print(table(rows))
    print(
        f"{args.rounds} rounds; median step seconds: "
        + ", ".join(f"{k} {v:.4f}" for k, v in {**medians(sam), **medians(dist), **medians(fused)}.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
