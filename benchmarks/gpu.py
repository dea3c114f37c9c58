"""GPU fast path throughput: images/s and MFU of teacher SAM fine-tuning and student
distillation steps on synthetic data, one GPU, bf16 autocast, channels_last CNN student,
optionally torch.compile. Finishes in well under 5 minutes on an H100.

MFU = model FLOPs per step (counted by torch's FlopCounterMode: forward + backward, two of
each for SAM, the teacher's forward for online distillation) x steps/s / the card's dense
bf16 peak. Give --peak-tflops for a card not in the table.

    python -m benchmarks.gpu [--compile] [--teacher vit_base_patch16_224 --student resnet18]
    python -m benchmarks.gpu --device cpu --teacher vit_micro_patch4 --student resnet10t \\
        --img 16 --batch 8 --steps 2      # a smoke run without a GPU (no MFU)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import machine, sync, table
from remem_ray.losses import DistillationLoss
from remem_ray.models import create_model
from remem_ray.sam import SAM
from remem_ray.train.common import autocast, runnable_model, to_device

# dense bf16 tensor-core peaks, FLOP/s (vendor data sheets)
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
             "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}


def card_peak(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16.items():  # most specific names first
        if key in name:
            return peak
    return None


def count_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(step, steps: int, warmup: int) -> float:
    """Seconds per step after warmup (compilation happens there)."""
    for _ in range(warmup):
        step()
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - began) / steps


def teacher_step_fn(name: str, batch: int, img: int, device: torch.device, compile_model: bool):
    model = create_model(name, 100, img).to(device).train()
    runnable, channels_last = runnable_model(model, device, compile_model)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)
    x = to_device(torch.rand(batch, 3, img, img), device, channels_last)
    y = torch.randint(0, 100, (batch,), device=device)

    def loss():
        with autocast(device):
            return F.cross_entropy(runnable(x).float(), y)

    def step():
        loss().backward()
        opt.first_step(zero_grad=True)
        loss().backward()
        opt.second_step(zero_grad=True)

    return step


def student_step_fn(teacher_name: str, student_name: str, batch: int, img: int, device: torch.device,
                    compile_model: bool):
    teacher = create_model(teacher_name, 100, img).to(device).eval().requires_grad_(False)
    student = create_model(student_name, 100, img).to(device).train()
    runnable, channels_last = runnable_model(student, device, compile_model)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    kd = DistillationLoss("kd", 4.0, 0.9)
    x = to_device(torch.rand(batch, 3, img, img), device, channels_last)
    y = torch.randint(0, 100, (batch,), device=device)

    def step():
        with torch.no_grad(), autocast(device):
            targets = teacher(x).float()
        with autocast(device):
            logits = runnable(x)
        kd(logits.float(), targets, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="vit_base_patch16_224")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(machine())
        raise SystemExit("benchmarks.gpu: no CUDA device here (use --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(machine())
    peak = card_peak(torch.cuda.get_device_name(0), args.peak_tflops) if device.type == "cuda" else None
    rows = [["workload", "images/s", "TFLOP/s", "MFU"]]
    cases = {
        f"teacher SAM fine-tuning ({args.teacher}, {args.img}px, batch {args.batch}, rho 0.05)":
            teacher_step_fn(args.teacher, args.batch, args.img, device, args.compile),
        f"student distillation ({args.student} from online {args.teacher}, batch {args.batch})":
            student_step_fn(args.teacher, args.student, args.batch, args.img, device, args.compile),
    }
    for label, step in cases.items():
        seconds = measure(step, args.steps, args.warmup)
        flops = count_flops(step)
        achieved = flops / seconds
        rows.append([label + (" compiled" if args.compile else ""), f"{args.batch / seconds:,.0f}",
                     f"{achieved / 1e12:.1f}", f"{achieved / peak:.1%}" if peak else "n/a"])
    print(table(rows))
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
              f"peak used for MFU: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16 dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
