"""Where a teacher epoch's time goes (issue 26, item 4): torch.profiler around the loop's own epoch.

The teacher runs end to end at 0.75 of its step rate on an H100 (RESULTS.md) with 4 % data wait.
This builds the production teacher (`TeacherTask`, its data pipeline) on a generated CIFAR-like
ImageFolder, runs a warm-up epoch as the loop does (training, then val and test eval: every
graph torch.compile makes is made there), a second epoch without the profiler (the end-to-end
rate), then profiles a third epoch's training steps (`--steps` of them, after one step waited and
one warming the profiler up). It prints each figure as it is measured (and keeps them in
`--out`/summary.json: a run cut short keeps what it measured), then

- the epoch: step-only rate, end-to-end rate, their ratio, data wait; the warm-up epoch's training
  and eval seconds against a later eval's, and the graphs torch.compile made in each (a first
  epoch is slower than the rest by its compiles: the training graph's, then the eval graph's);
- within the profiled steps: wall per step, device (kernel) time per step, the device's idle share
  (1 - kernel time / wall), host syncs per step (the CUDA runtime's synchronize calls; none on a
  CPU run), graphs torch.compile made in the warm-up epoch and in the profiled one;
- the top entries by self device time and by self CPU time;

and keeps the Chrome trace (`--out`/teacher_epoch.json) for Perfetto or chrome://tracing.

    python -m benchmarks.teacher_profile --out DIR                         # GPU: vit_base_patch16_224, 224 px
    python -m benchmarks.teacher_profile --smoke --out DIR [--check]      # CPU, compile on, about a minute
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.gpu import epoch_throughput, fixed_batch_step, warm_seconds_per_call, write_imagefolder
from benchmarks.harness import machine, seconds_per_call, sync, table
from remem_ray.config import RunSpec
from remem_ray.contract import LoopConfig
from remem_ray.train.common import evaluate
from remem_ray.train.loop import EpochClock, prepare
from remem_ray.train.teacher import TeacherTask

# the CUDA runtime calls that make the host wait for the device (each drains the queue the CPU was
# filling ahead; .item()/.tolist() on a CUDA tensor is a copy then cudaStreamSynchronize). Not
# aten::_local_scalar_dense: on a CPU tensor (AdamW's step counts) it waits for nothing.
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
WAIT_STEPS = 1  # steps before the profiler starts; it warms up over the next, then records


@dataclass(frozen=True)
class OpRow:
    """One entry of the profiler's key averages, as plain numbers (microseconds). `kernel`: an entry
    the device ran (a kernel, copy or memset), not a CPU op (whose self device time repeats that of
    the kernels it launched) nor a user annotation such as ProfilerStep#N (which spans them)."""

    name: str
    calls: int
    self_cpu_us: float
    self_device_us: float
    kernel: bool = False


def op_rows(profile: torch.profiler.profile) -> list[OpRow]:
    from torch.autograd import DeviceType

    rows = []
    for event in profile.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        kernel = event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False)
        rows.append(OpRow(event.key, int(event.count), float(event.self_cpu_time_total), float(device_us), kernel))
    return rows


def summarize(rows: list[OpRow], steps: int, wall_s: float, own_syncs: int = 0) -> dict[str, float]:
    """Per-step figures of a profiled window: wall, kernel time, the device's idle share, host syncs.

    Kernel time is the sum of the kernels' own device time (they run one at a time on the loop's
    one stream, so this is the time the device was busy; torch's own table sums the same rows);
    the idle share is what the wall had beyond it. Host syncs count the CUDA runtime's
    synchronize calls, less `own_syncs` (the benchmark's own, at the window's end).
    """
    steps = max(steps, 1)
    device_s = sum(r.self_device_us for r in rows if r.kernel) / 1e6
    syncs = max(0, sum(r.calls for r in rows if r.name in HOST_SYNCS) - own_syncs)
    return {
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "device_ms_per_step": 1e3 * device_s / steps,
        "device_idle_share": max(0.0, 1.0 - device_s / wall_s) if wall_s > 0 and device_s > 0 else float("nan"),
        "host_syncs_per_step": syncs / steps,
    }


def top(rows: list[OpRow], key: str, n: int) -> list[list[str]]:
    """The n largest entries by `key`; by device time only the kernels count (see OpRow)."""
    pool = [r for r in rows if r.kernel] if key == "self_device_us" else rows
    ranked = sorted(pool, key=lambda r: getattr(r, key), reverse=True)[:n]
    total = sum(getattr(r, key) for r in pool) or 1.0
    out = [["entry", "calls", "self device ms", "self CPU ms", "share"]]
    for r in ranked:
        share = getattr(r, key) / total
        out.append(
            [r.name[:70], str(r.calls), f"{r.self_device_us / 1e3:.1f}", f"{r.self_cpu_us / 1e3:.1f}", f"{share:.1%}"]
        )
    return out


def last_recorded_step(steps: int) -> int:
    """The profiler waits WAIT_STEPS steps, warms up over one, then records `steps`: batches
    WAIT_STEPS + 1 .. WAIT_STEPS + steps (0-based). The window ends after the last of them, before
    the profiler's step() that stops and collects (a mark one step later ran that collection in)."""
    return WAIT_STEPS + steps


def stepping(batches: Iterable, profile: torch.profiler.profile, last: int, marks: list[float]) -> Iterator:
    """The batches, advancing the profiler's schedule after each step. The window's marks are taken
    after step WAIT_STEPS (the profiler warming up, not recording) and after step `last` (recording,
    before the step() that stops it and collects: that cost stays outside), each after waiting for
    the device, so the window's wall is the device's; the second wait is one host sync of ours."""
    for index, batch in enumerate(batches):
        yield batch
        if index in (WAIT_STEPS, last):
            sync()
            marks.append(time.perf_counter())
        profile.step()


def graphs_made() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def spec_for(args, data_root: Path, storage: Path) -> RunSpec:
    return RunSpec.model_validate(
        {
            "name": "teacher-profile",
            "device": args.device,
            "compile": args.compile,
            "data": {"name": "imagefolder", "root": str(data_root), "img_size": args.img},
            "teacher": {
                "model": args.teacher,
                "model_kwargs": args.model_kwargs,
                "batch_size": args.batch,
                "epochs": 100,
                "rho": 0.05,
                "alpha": 0.9,
            },
            "storage": {"root": str(storage)},
        }
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default="vit_base_patch16_224")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=5000, help="training images in the generated folder")
    parser.add_argument("--compile", default="auto", help="auto, true or false")
    parser.add_argument("--steps", type=int, default=12, help="training steps the profiler records")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trace and the summary")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run of the same accounting")
    parser.add_argument("--check", action="store_true", help="exit 1 when a figure is missing")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps: at least 1")
    compile_arg = str(args.compile).lower()
    if compile_arg not in ("auto", "true", "false"):
        parser.error(f"--compile: auto, true or false, not {args.compile!r}")
    args.model_kwargs = {}
    if args.smoke:
        args.device, args.teacher, args.img, args.batch, args.images = "cpu", "vit_micro_patch4", 16, 32, 640
        args.model_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
        args.steps = min(args.steps, 8)
        compile_arg = "true" if compile_arg == "auto" else compile_arg  # to count its graphs
    args.compile = {"true": True, "false": False}.get(compile_arg, "auto")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.teacher_profile: no CUDA device here (use --smoke for a CPU run)")
    print(machine(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, float | int] = {}

    def keep(**figures: float | int) -> None:
        """Each figure as soon as it is measured: a run cut short by its time limit keeps them."""
        summary.update(figures)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        for name, value in figures.items():
            print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}", flush=True)

    with tempfile.TemporaryDirectory(prefix="remem-teacher-profile-") as tmp:
        work = Path(tmp)
        spec = spec_for(args, write_imagefolder(work / "imgs", args.images), work / "out")
        ctx = prepare(LoopConfig(spec, str(work / "teacher"), quiet=True), "teacher")
        task = TeacherTask(ctx)
        steps_per_epoch = len(task.train_batches)
        last = last_recorded_step(args.steps)
        if steps_per_epoch <= last:
            raise SystemExit(f"--steps: {args.steps} and {WAIT_STEPS + 1} before exceed the epoch's {steps_per_epoch}")

        def evaluate_all() -> None:
            for split in ("val", "test"):
                evaluate(task.model, task.normalizer, ctx.eval_batches[split], ctx.device)

        graphs_before = graphs_made()
        warm_train = epoch_throughput(task, ctx, 1)  # warm-up: compiles, allocator, autotuning
        graphs_train = graphs_made() - graphs_before
        warm_eval_s = seconds_per_call(evaluate_all, 1)
        graphs_warm = graphs_made() - graphs_before
        keep(
            steps_per_epoch=steps_per_epoch,
            warm_epoch_train_s=warm_train["train_seconds"],
            warm_epoch_eval_s=warm_eval_s,
            graphs_made_warm_training=graphs_train,
            graphs_made_warm_eval=graphs_warm - graphs_train,
        )
        e2e = epoch_throughput(task, ctx, 2)  # as the loop runs it, with no profiler on
        keep(later_eval_s=seconds_per_call(evaluate_all, 1))
        step, batch = fixed_batch_step(task, ctx)
        step_ips = batch / warm_seconds_per_call(step, 10, 2)
        keep(
            step_only_img_s=step_ips,
            end_to_end_img_s=e2e["images_per_s"],
            e2e_over_step=e2e["images_per_s"] / step_ips,
            data_wait_share=e2e["data_wait_share"],
        )

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=WAIT_STEPS, warmup=1, active=args.steps, repeat=1)
        marks: list[float] = []
        with torch.profiler.profile(activities=activities, schedule=schedule) as profile:
            task.train_batches.set_epoch(3)
            clock = EpochClock(ctx.device)
            task.train_epoch(ctx, stepping(clock.batches(task.train_batches), profile, last, marks))
        rows = op_rows(profile)
        own_syncs = 1 if device.type == "cuda" else 0  # stepping's wait at the window's end
        keep(
            graphs_made_profiled_epoch=graphs_made() - graphs_before - graphs_warm,
            **summarize(rows, args.steps, marks[1] - marks[0], own_syncs),
        )
        trace = args.out / "teacher_epoch.json"
        profile.export_chrome_trace(str(trace))
    print()
    print(
        table(
            [["measure", "value"], *([k, f"{v:.3g}" if isinstance(v, float) else str(v)] for k, v in summary.items())]
        )
    )
    by = "self_device_us" if device.type == "cuda" else "self_cpu_us"
    print(f"\ntop entries by {'self device time (kernels)' if by == 'self_device_us' else 'self CPU time'}:")
    print(table(top(rows, by, 15)))
    if device.type == "cuda":
        print("\ntop entries by self CPU time:")
        print(table(top(rows, "self_cpu_us", 15)))
    print(f"\ntrace: {trace} ({trace.stat().st_size / 2**20:.1f} MiB)")
    if args.check:
        problems = [k for k in ("wall_ms_per_step", "host_syncs_per_step") if summary[k] != summary[k]]
        if not rows or summary["end_to_end_img_s"] <= 0:
            problems.append("profiler rows / end-to-end rate")
        if device.type == "cuda" and not summary["device_ms_per_step"] > 0:
            problems.append("kernel time (no CUDA activity recorded: CUPTI missing?)")
        if problems:
            print(f"teacher_profile --check: missing {', '.join(problems)}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
