"""A whole sweep's GPU-busy share (issue 26): what users pay for is GPU-hours, what they get is the
share of them with a kernel running.

Runs `remem sweep run` as a user would (a fresh local Ray, a temporary root) on a sweep of the size
users try first: a generated CIFAR-like ImageFolder (10 classes, --images training images) at
224 px, a `vit_base_patch16_224` teacher from scratch (2 epochs, both candidate checkpoints),
`resnet18` students on cached targets, 6 trials (rho x teacher epoch), `gpus_per_worker: auto`
(the driver measures each role's step and sizes the shares and the trials at once; the sweep's
"GPU shares" lines are printed) or a fixed share (`--gpus-per-worker 0.5`: two trials at once).
Meanwhile it samples the GPU every 0.5 s (NVML, else nvidia-smi) and prints:

- wall time; GPU-busy share = mean of utilization.gpu (the share of each sample period with a
  kernel running) over the sweep; epoch cover = wall time covered by a running epoch (with
  --deadline, both up to the moment the sweep was stopped: its ending idles the GPU);
- per Train run: its start split, fit() -> first epoch (remem_ray.train.loop's marks: worker
  process, imports, Train's setup, CUDA context, data, models and targets, first batch), compile
  seconds, first epoch against the later ones;
- peak GPU memory (nvidia-smi) and peak worker RSS;
- with `auto`, each Train-run kind's reserved peak against the memory its share was sized for
  (the probe's figure in the sweep's gpu_shares.json; `--check` fails a run over it).

Without a GPU, `--smoke` runs a tiny sweep on the CPU with the same accounting from the loop's
marks (no samples: the busy share is left out); CI runs it with `--check` (.ci/run), which exits 1
when a figure is missing.

    python -m benchmarks.gpu_sweep [--images 10000] [--trials 6]       # on a GPU machine
    python -m benchmarks.gpu_sweep --smoke [--check]                    # CPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.harness import machine, table
from benchmarks.sweep_overhead import START_MARKS, collect, covered_seconds, refuse_errored

SAMPLE_MS = 500
QUERY = "utilization.gpu,memory.used"


def spec_for(smoke: bool, data_root: Path, trials: int, gpus_per_worker: float | str) -> dict:
    """The benchmark's sweep: user-sized on a GPU, tiny with --smoke."""
    if smoke:
        teacher = {"model": "vit_micro_patch4", "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
        teacher |= {"epochs": 2, "batch_size": 32}
        student = {"model": "resnet10t", "epochs": 2, "batch_size": 32, "target_views": 2}
        img_size, worker = 16, {"num_workers": 1, "cpus_per_worker": 0.9}
    else:
        teacher = {"model": "vit_base_patch16_224", "epochs": 2, "batch_size": 128}
        student = {"model": "resnet18", "epochs": 3, "batch_size": 256, "target_views": 4}
        img_size, worker = 224, {"num_workers": 1, "cpus_per_worker": 4, "gpus_per_worker": gpus_per_worker}
    rhos = [0.0, 0.05, 0.1][: max(1, math.ceil(trials / 2))]
    return {
        "name": "gpu-sweep-smoke" if smoke else "gpu-sweep",
        "data": {"name": "imagefolder", "root": str(data_root), "img_size": img_size},
        "teacher": {**teacher, "checkpoint_epochs": [1, 2], "alpha": 0.9, "optimizer": {"lr": 1e-3}},
        "student": {**student, "teacher_targets": "cached"},
        "sweep": {
            "num_samples": trials,
            # auto on the GPU: the shares the driver sizes decide how many trials fit at once
            "max_concurrent_trials": None if gpus_per_worker == "auto" and not smoke else 2,
            "seed": 0,
            "search": {"rho": {"values": rhos}, "alpha": {"values": [0.9]}, "teacher_epoch": [1, 2]},
            "asha": {"enabled": False},  # every trial runs its epochs: the measure is the GPU's, not ASHA's
            "resources": {"teacher": worker, "student": worker, "trial_cpus": 0.1},
        },
    }


def parse_samples(text: str, until: float | None = None) -> list[tuple[float, float]]:
    """The sampler's CSV lines (time, utilization %, memory MiB), or nvidia-smi's own (utilization,
    memory), one per sample; others are skipped. `until`: only samples taken by then (a sweep
    stopped at its deadline idles the GPU while it ends: not the sweep's share)."""
    samples = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        try:
            values = [float(c) for c in cells]
        except ValueError:
            continue
        if len(values) == 3 and (until is None or values[0] <= until):
            samples.append((values[1], values[2]))
        elif len(values) == 2:
            samples.append((values[0], values[1]))
    return samples


def busy_share(samples: list[tuple[float, float]]) -> float:
    """Share of the sampled time with a kernel running: utilization.gpu is that share of each
    sample period, so the mean over equal periods is the share of the whole."""
    return statistics.fmean(u for u, _ in samples) / 100.0 if samples else math.nan


class GpuSampler:
    """The GPUs' utilization.gpu (mean over the cards) and memory.used (the fullest card) every
    SAMPLE_MS into a file, each line with its time and flushed as it is taken, so a run cut off by
    its timeout keeps them: NVML (nvidia-ml-py) from a thread, else nvidia-smi asked each time.
    (nvidia-smi -lms writing into a file buffered its output, and a terminate lost the last
    block: a minute of samples.) Nothing without a GPU."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        read = _nvml_reader() or _smi_reader()
        if read is not None:
            self._thread = threading.Thread(target=self._sample, args=(read,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, read) -> None:
        with self.out.open("w") as f:
            while not self._stop.wait(SAMPLE_MS / 1000):
                try:
                    utilization, memory = read()
                except Exception:  # noqa: BLE001  (a sample missed is no figure lost)
                    continue
                f.write(f"{time.time():.3f},{utilization:.1f},{memory:.0f}\n")
                f.flush()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def samples(self, until: float | None = None) -> list[tuple[float, float]]:
        return parse_samples(self.out.read_text(), until) if self.out.exists() else []


def _nvml_reader():
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001  (no nvidia-ml-py, no driver, no GPU)
        return None
    if not handles:
        return None

    def read() -> tuple[float, float]:
        utilization = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        memory = [pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20 for h in handles]
        return statistics.fmean(utilization), max(memory)

    return read


def _smi_reader():
    if not shutil.which("nvidia-smi"):
        return None

    def read() -> tuple[float, float]:
        args = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
        cards = parse_samples(subprocess.run(args, capture_output=True, text=True, timeout=5).stdout)
        return statistics.fmean(u for u, _ in cards), max(m for _, m in cards)

    return read


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _mib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def run_table(runs: list[dict]) -> str:
    """Per role, the median of each start part, compile seconds and first vs later epochs and evals."""
    header = [
        "Train run",
        "n",
        *(name for name, _ in START_MARKS),
        "compile s",
        "epoch 1 s",
        "later epochs s",
        "eval 1 s",
        "later evals s",
        "peak GPU MiB",
    ]
    rows = [header]
    for role in dict.fromkeys(r["role"] for r in runs):
        mine = [r for r in runs if r["role"] == role]

        def median(values: list[float]) -> float:
            kept = [v for v in values if not math.isnan(v)]
            return statistics.median(kept) if kept else math.nan

        parts = [_seconds(median([r["split"][name] for r in mine])) for name, _ in START_MARKS]
        rows.append(
            [
                role,
                str(len(mine)),
                *parts,
                _seconds(median([r["compile_seconds"] for r in mine])),
                _seconds(median([r["first_epoch_seconds"] for r in mine])),
                _seconds(median([r["later_epoch_seconds"] for r in mine])),
                _seconds(median([r["first_eval_seconds"] for r in mine])),
                _seconds(median([r["later_eval_seconds"] for r in mine])),
                _mib(max((v for r in mine if not math.isnan(v := r["peak_gpu_memory_mb"])), default=math.nan)),
            ]
        )
    return table(rows)


def _gpus(text: str) -> float | str:
    return text if text == "auto" else float(text)


def sizing_lines(console: str) -> list[str]:
    """The sweep console's lines on its GPU shares and concurrency (what `auto` chose, and why)."""
    return [line for line in console.splitlines() if "GPU shares" in line or " at a time; log " in line]


def probe_check(record: dict | None, runs: list[dict]) -> tuple[list[list[str]], list[str]]:
    """(table rows, problems): each Train-run kind's largest reserved peak against the memory the
    probe gave its share (`gpus_per_worker: auto`, the sweep's gpu_shares.json): a run over it
    overfills the card it shares. A teacher's run holds its student phase where both roles share
    one figure; the process's own MiB (CUDA context, workspaces) lie outside the allocator's peak."""
    if not record:
        return [], []
    roles, merged = record["roles"], record["teacher_run_distils"]
    rows = [["Train run", "sized for MiB (need less the process)", "run's peak MiB", "within"]]
    problems = []
    for kind in dict.fromkeys(r["role"] for r in runs):
        basis = ["student"] if kind == "student" else ["teacher", "student"] if merged else ["teacher"]
        needs = [roles[role]["need_mb"] for role in basis if roles[role].get("need_mb") is not None]
        peaks = [r["peak_gpu_memory_mb"] for r in runs if r["role"] == kind and not math.isnan(r["peak_gpu_memory_mb"])]
        if not needs or not peaks:
            continue
        allowed, peak = max(needs) - record["process_mb"], max(peaks)
        rows.append([kind, f"{allowed:.0f}", f"{peak:.0f}", "yes" if peak <= allowed else "NO"])
        if peak > allowed:
            problems.append(
                f"a {kind} run reserved {peak:.0f} MiB, over the {allowed:.0f} MiB its GPU share was sized for"
            )
    return rows, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny sweep on the CPU (no GPU needed)")
    parser.add_argument("--images", type=int, default=10000, help="training images of the generated dataset")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument(
        "--gpus-per-worker", type=_gpus, default="auto", help="a share of a GPU per Train worker, or auto (default)"
    )
    parser.add_argument("--log", type=Path, default=None, help="write the sweep's console here as it runs")
    parser.add_argument("--samples", type=Path, default=None, help="write nvidia-smi's samples here as they come")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: then stop the sweep as Ctrl-C does (Tune saves it) and account for what it stored",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless the accounting is complete (CI)")
    args = parser.parse_args(argv)
    from benchmarks.gpu import write_imagefolder

    print(machine())
    with tempfile.TemporaryDirectory(prefix="remem-gpu-sweep-") as tmp:
        work = Path(tmp)
        images = min(args.images, 200) if args.smoke else args.images
        data_root = write_imagefolder(work / "imgs", images, eval_per_class=4 if args.smoke else 20)
        spec = spec_for(args.smoke, data_root, 2 if args.smoke else args.trials, args.gpus_per_worker)
        spec_path = work / "sweep.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        root = work / "results"
        cmd = [sys.executable, "-m", "remem_ray.cli", "sweep", "run", str(spec_path), "--storage", str(root)]
        log_path = args.log or work / "sweep-console.log"
        with GpuSampler(args.samples or work / "gpu.csv") as sampler, open(log_path, "w") as log:
            began = time.time()
            returncode, stopped_at = run_until(cmd, tmp, log, args.deadline)
            # stopped at the deadline: the sweep's share up to then (its ending idles the GPU)
            wall = (stopped_at or time.time()) - began
        # 1: a trial failed (its table still says how far the runs got); 130: stopped at the deadline
        # (or killed after the grace: what it stored still counts)
        if returncode not in (0, 1, INTERRUPTED) and stopped_at is None:
            print(log_path.read_text()[-6000:])
            raise SystemExit(f"gpu_sweep: the sweep failed with exit code {returncode}")
        if stopped_at is not None:
            print(
                f"gpu_sweep: the sweep was stopped at its deadline ({args.deadline:.0f} s, exit code {returncode}): "
                f"figures of what ran by then"
            )
        console = log_path.read_text()
        data = collect(root, spec["name"])
        sizing = root / "sweeps" / spec["name"] / "gpu_shares.json"
        record = json.loads(sizing.read_text()) if sizing.exists() else None
        samples = sampler.samples(until=stopped_at)
        if stopped_at is not None:  # epochs that ran on while the sweep ended are not the sweep's
            data["intervals"] = [(a, min(b, stopped_at)) for a, b in data["intervals"] if a < stopped_at]
    peak_memory = max((memory for _, memory in samples), default=math.nan)
    rows = [
        ["measure", "value"],
        ["sweep", f"{spec['sweep']['num_samples']} trials, {spec['teacher']['model']} -> {spec['student']['model']}"],
        ["wall time", f"{wall:.1f} s"],
        ["GPU-busy share (mean utilization.gpu)", "-" if not samples else f"{busy_share(samples):.1%}"],
        ["epoch cover (wall time with an epoch running)", f"{covered_seconds(data['intervals']) / wall:.1%}"],
        ["GPU samples / peak GPU memory", "-" if not samples else f"{len(samples)} / {peak_memory:.0f} MiB"],
        ["peak worker RSS", f"{data['worker_rss_mb']:.0f} MB"],
    ]
    print(table(rows))
    print("\n".join(sizing_lines(console)))
    print(run_table(data["runs"]))
    sizing_rows, oversized = probe_check(record, data["runs"])
    if sizing_rows:
        print(table(sizing_rows))
    problems = accounting_problems(data["runs"], covered_seconds(data["intervals"]) / wall, samples, args.smoke)
    problems += oversized
    for problem in problems:
        print(f"gpu_sweep: {problem}")
    refuse_errored(data["summary"])  # after the tables: how far a failed trial's runs got is the news
    if returncode != 0:
        return 1
    return 1 if args.check and problems else 0


INTERRUPTED = 130  # remem's exit code after Ctrl-C (the sweep's state saved)
STOP_GRACE_S = 60.0  # after the deadline's Ctrl-C, before the sweep is killed


def run_until(cmd: list[str], cwd: str, log, deadline: float | None) -> tuple[int, float | None]:
    """Run the sweep; past `deadline` seconds stop it as Ctrl-C does (SIGINT: Tune saves its state
    and ends the trials), and kill it if it has not ended STOP_GRACE_S later. (Its exit code, the
    time it was stopped or None.)"""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=deadline), None
    except subprocess.TimeoutExpired:
        stopped_at = time.time()
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=STOP_GRACE_S), stopped_at
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), stopped_at


def accounting_problems(runs: list[dict], cover: float, samples: list, smoke: bool) -> list[str]:
    """What the figures lack: a Train run of each kind, every start mark in order, an epoch cover
    within (0, 1], and GPU samples unless on the CPU."""
    problems = []
    roles = {r["role"] for r in runs}
    if "teacher" not in roles or not roles - {"teacher"}:
        problems.append(f"expected teacher and student runs, found {sorted(roles)}")
    for run in runs:
        bad = [name for name, seconds in run["split"].items() if not seconds >= 0]  # NaN fails too
        if bad:
            problems.append(f"a {run['role']} run lacks or misorders its start marks: {bad}")
    if not 0 < cover <= 1:
        problems.append(f"epoch cover {cover:.3f} is outside (0, 1]")
    if not smoke and not samples:
        problems.append("no GPU samples (nvidia-smi missing or silent)")
    return problems


if __name__ == "__main__":
    raise SystemExit(main())
