"""GPU throughput, step only and end to end: teacher SAM fine-tuning, student distillation from an
online teacher, and from cached targets, each through the production code (the loop's Task, its
`step`, its data pipeline) on a generated CIFAR-like ImageFolder (32-px PNGs) trained at --img px.

For each workload:
- step only: the task's `step` on one batch already on the device (the card's ceiling);
- end to end: a whole training epoch as `remem run` runs it (pipeline, step, scheduler, meter),
  after a warm-up epoch; its ratio to step only says how much the input pipeline costs;
- pipeline only: the training batches alone, augmented and on the device;
- TFLOP/s (torch's FlopCounterMode over one step) and MFU against the card's dense bf16 peak.

    python -m benchmarks.gpu [--pipeline device|loader] [--compile auto|true|false]
    python -m benchmarks.gpu --device cpu --teacher vit_micro_patch4 --student resnet10t \\
        --img 16 --batch 8 --images 64 --steps 2 --warmup 1    # a smoke run without a GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import machine, seconds_per_call, sync, table
from remem_ray.checkpoints import model_meta, write_checkpoint
from remem_ray.config import RunSpec
from remem_ray.contract import LoopConfig
from remem_ray.storage import Storage
from remem_ray.train.common import to_device
from remem_ray.train.loop import EpochClock, LoopContext, Task, prepare
from remem_ray.train.student import StudentTask
from remem_ray.train.teacher import TeacherTask

# dense bf16 tensor-core peaks, FLOP/s (vendor data sheets)
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
NUM_CLASSES = 10


def card_peak(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_BF16.items():  # most specific names first
        if key in name:
            return peak
    return None


def write_imagefolder(root: Path, train_images: int, eval_per_class: int = 20, seed: int = 0) -> Path:
    """A CIFAR-like ImageFolder: 10 classes of 32-px PNGs (class prototypes plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (NUM_CLASSES, 8, 8, 3))
    per_class = {"train": max(1, train_images // NUM_CLASSES), "val": eval_per_class, "test": eval_per_class}
    for split, n in per_class.items():
        for c in range(NUM_CLASSES):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.kron(protos[c], np.ones((4, 4, 1)))
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:05d}.png")
    return root


def count_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def rate(per_s: float) -> str:
    """A throughput with at least three significant digits (a loaded CPU runs at 1.4 img/s, not "1")."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def warm_seconds_per_call(fn, calls: int, warmup: int) -> float:
    """Seconds per call after warmup (compilation happens there)."""
    for _ in range(warmup):
        fn()
    return seconds_per_call(fn, calls)


def fixed_batch_step(task: Task, ctx: LoopContext):
    """The task's step on its first training batch, held on the device."""
    task.train_batches.set_epoch(1)
    images, labels, *extra = next(iter(task.train_batches))
    images = to_device(images, ctx.device, task.channels_last)
    labels = labels.to(ctx.device)
    task.model.train()
    return (lambda: task.step(images, labels, extra)), len(labels)


def epoch_throughput(task: Task, ctx: LoopContext, epoch: int) -> dict[str, float]:
    task.train_batches.set_epoch(epoch)
    clock = EpochClock(ctx.device)
    task.train_epoch(ctx, clock.batches(task.train_batches))
    return clock.metrics(world_size=1)


def pipeline_throughput(batches, device: torch.device) -> float:
    batches.set_epoch(1)
    sync()
    began, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch[1])
    sync()
    return images / (time.perf_counter() - began)


def spec_for(args, data_root: Path, storage: Path, **student) -> RunSpec:
    return RunSpec.model_validate(
        {
            "name": "gpu-bench",
            "device": args.device,
            "compile": args.compile,
            "data": {
                "name": "imagefolder",
                "root": str(data_root),
                "img_size": args.img,
                "pipeline": args.pipeline,
                "num_workers": args.num_workers,
                "num_classes": NUM_CLASSES,
            },
            "teacher": {"model": args.teacher, "batch_size": args.batch, "epochs": 100, "rho": 0.05, "alpha": 0.9},
            "student": {
                "model": args.student,
                "batch_size": args.student_batch or args.batch,
                "epochs": 100,
                "target_views": args.views,
                **student,
            },
            "storage": {"root": str(storage)},
        }
    )


def teacher_checkpoint(task: TeacherTask, ctx: LoopContext, folder: Path) -> str:
    """A checkpoint of the benchmarked teacher for the students to distil from."""
    storage = Storage(str(folder))
    meta = model_meta(
        task.bare,
        ctx.spec.teacher.model,
        ctx.spec.teacher.model_kwargs,
        ctx.splits.num_classes,
        ctx.spec.data.img_size,
        role="teacher",
        epoch=1,
        metrics={},
    )
    write_checkpoint(storage, "epoch_1", task.bare, meta)
    return storage.uri("epoch_1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="vit_base_patch16_224")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--student-batch", type=int, default=256, help="student batch (cached targets fill a GPU)")
    parser.add_argument("--images", type=int, default=10000, help="training images in the generated folder")
    parser.add_argument("--views", type=int, default=4, help="cached targets: views per image")
    parser.add_argument("--pipeline", default="auto", choices=["auto", "device", "loader"])
    parser.add_argument("--num-workers", type=int, default=None, help="loader pipeline: DataLoader workers")
    parser.add_argument("--compile", default="auto", help="auto, true or false")
    parser.add_argument("--steps", type=int, default=30, help="timed steps for step-only")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workloads", default="teacher,online,cached")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--data", type=Path, default=None, help="an existing generated folder to reuse")
    args = parser.parse_args(argv)
    args.compile = {"true": True, "false": False}.get(str(args.compile).lower(), "auto")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(machine())
        raise SystemExit("benchmarks.gpu: no CUDA device here (use --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # (fp32 parts outside autocast)
    print(machine())
    peak = card_peak(torch.cuda.get_device_name(0), args.peak_tflops) if device.type == "cuda" else None
    rows = [
        [
            "workload",
            "step only img/s",
            "end to end img/s",
            "e2e / step",
            "data wait",
            "pipeline only img/s",
            "TFLOP/s (step)",
            "MFU (step)",
        ]
    ]
    wanted = set(args.workloads.split(","))
    with tempfile.TemporaryDirectory(prefix="remem-gpu-bench-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        data_root = args.data or write_imagefolder(work / "imgs", args.images)
        print(f"data: {data_root} ({time.perf_counter() - began:.1f} s to write)", flush=True)
        spec = spec_for(args, data_root, work / "out")
        teacher_ctx = prepare(LoopConfig(spec, str(work / "teacher")), "teacher")
        teacher = TeacherTask(teacher_ctx)
        location = teacher_checkpoint(teacher, teacher_ctx, work / "teacher-ckpt")
        cases: list[tuple[str, Task, LoopContext]] = []
        if "teacher" in wanted:
            cases.append((f"teacher SAM ({args.teacher}, batch {args.batch})", teacher, teacher_ctx))
        for targets in ("online", "cached"):
            if targets not in wanted:
                continue
            s_spec = spec_for(args, data_root, work / "out", teacher_targets=targets)
            ctx = prepare(LoopConfig(s_spec, str(work / f"student-{targets}")), "student")
            label = (
                f"student {args.student} ({targets} {'teacher' if targets == 'online' else 'targets'}, "
                f"batch {s_spec.student.batch_size})"
            )
            cases.append((label, StudentTask(ctx, location), ctx))
        for label, task, ctx in cases:
            step, batch = fixed_batch_step(task, ctx)
            step_s = warm_seconds_per_call(step, args.steps, args.warmup)
            flops = count_flops(step)
            epoch_throughput(task, ctx, 1)  # warm-up epoch: allocator, cudnn autotuning, any recompiles
            e2e = epoch_throughput(task, ctx, 2)
            pipe = pipeline_throughput(task.train_batches, ctx.device)
            step_ips = batch / step_s
            achieved = flops / step_s
            rows.append(
                [
                    label,
                    rate(step_ips),
                    rate(e2e["images_per_s"]),
                    f"{e2e['images_per_s'] / step_ips:.2f}",
                    f"{e2e['data_wait_share']:.0%}",
                    rate(pipe),
                    f"{achieved / 1e12:.1f}",
                    f"{achieved / peak:.1%}" if peak else "n/a",
                ]
            )
            # each row as it is measured: a run cut short by its time limit keeps what it measured
            print(f"{label}: " + " | ".join(f"{h} {v}" for h, v in zip(rows[0][1:], rows[-1][1:])), flush=True)
        print(
            f"pipeline: {teacher_ctx.data.describe()}; compile {spec.compile}; {args.img} px; "
            f"{len(teacher_ctx.splits.train)} training images"
        )
    print(table(rows))
    if device.type == "cuda":
        print(
            f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
            f"peak used for MFU: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16 dense"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
