"""Sweep overhead: how much of a sweep's wall time no training loop is running.

Runs `remem sweep run SPEC` as a user would (a fresh local Ray, a temporary storage root),
then reads back from storage every teacher and student epoch's start time and length.

- overhead = 1 - (time covered by at least one running epoch) / wall time   (target < 15 %
  on the default sweep); wall time counts everything: Python start, Ray start and stop,
  trial scheduling, Train worker-group start, checkpoints, the report.
- slot use = summed epoch time / (wall time x concurrent trials).
- Train-run start latency: trainer.fit() called -> its first epoch begins, split at the worker
  process's start (Ray's scheduling before it), its imports done (torch, timm, ours), the loop
  function's entry (Train's worker setup before it) and the first epoch (data, models). A
  student distilled in its teacher's run counts from the phase switch instead.
- teacher reuse: teacher trainings performed == distinct teacher keys.
- peak RSS: the largest Train worker and trial-driver process.

    python -m benchmarks.sweep_overhead [--spec search_spaces/smoke.yaml]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine, table, verdict
from remem_ray.contract import STUDENT_REPLAYED
from remem_ray.storage import Storage
from remem_ray.sweep.registry import TeacherRegistry
from remem_ray.teacher_layout import HISTORY_FILE

ROOT = Path(__file__).resolve().parents[1]


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


# A Train run's start, fit() to its first epoch, as the loop marks it (remem_ray.train.loop.prepare):
# (what the interval ending at the mark holds, the mark's report key)
START_MARKS = (
    ("worker process (Ray's scheduling, process boot)", "process_started_at"),
    ("imports (torch, timm, ours)", "module_imported_at"),
    ("Train's worker setup", "loop_entered_at"),
    ("device (CUDA context)", "device_ready_at"),
    ("data pipeline", "data_ready_at"),
    ("models, teacher, targets", "task_built_at"),
    ("resume state, first batch", "epoch_started_at"),
)


STUDENT_AFTER_TEACHER = "student phase in its teacher's run"


def start_split(first_epoch: dict, fit_called_at: float, process_up: bool = False) -> dict[str, float]:
    """Seconds of each part of a run's start (START_MARKS' names), from fit() to its first epoch;
    a mark the run did not record (an older version) leaves NaN in the two parts beside it.
    process_up: a student phase in its teacher's run, counted from the phase switch
    (`fit_called_at`), its process and imports already there (0 s)."""
    marks = [fit_called_at] + [first_epoch.get(key, math.nan) for _, key in START_MARKS]
    if process_up:
        marks[1] = marks[2] = fit_called_at
    return {name: b - a for (name, _), a, b in zip(START_MARKS, marks, marks[1:])}


def start_parts(first_epoch: dict, fit_called_at: float) -> tuple[float, ...]:
    """Seconds from fit() to the worker process, to its imports done, to the loop's entry, to the first epoch."""
    marks = [fit_called_at]
    marks += [first_epoch.get(k, math.nan) for k in ("process_started_at", "module_imported_at", "loop_entered_at")]
    marks.append(first_epoch["epoch_started_at"])
    return tuple(b - a for a, b in zip(marks, marks[1:]))


def collect(root: Path, name: str) -> dict:
    """Epoch intervals, start latencies and memory of one finished sweep, from its storage."""
    experiment = root / "sweeps" / name
    intervals, loop_seconds, worker_rss, driver_rss = [], 0.0, [], []
    # "student": a run of its own (fit() -> first epoch); "student_after_teacher": the student phase
    # of its teacher's run (phase switch -> first epoch: that run's processes were already up)
    latencies: dict[str, list[float]] = {"teacher": [], "student": [], "student_after_teacher": []}
    parts: dict[str, list[tuple[float, ...]]] = {"teacher": [], "student": []}
    runs: list[dict] = []  # one row per Train run (or student phase) that started at its epoch 1
    for record_file in sorted((experiment / "teacher-trainings").glob("*.json")):
        record = json.loads(record_file.read_text())
        teacher = TeacherRegistry(Storage(str(root / "teachers"))).set_in_use(record["teacher_key"])
        assert teacher is not None, record
        history = json.loads(teacher.folder.read_text(HISTORY_FILE))
        for h in history:
            intervals.append((h["epoch_started_at"], h["epoch_started_at"] + h["epoch_seconds"]))
            loop_seconds += h["epoch_seconds"]
            worker_rss.append(h["peak_rss_mb"])
        if history[0]["start_epoch"] == 1 and record.get("fit_called_at") is not None:  # a late record: no start
            latencies["teacher"].append(history[0]["epoch_started_at"] - record["fit_called_at"])
            parts["teacher"].append(start_parts(history[0], record["fit_called_at"]))
            runs.append(run_row("teacher", history, record["fit_called_at"]))
    for result_file in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not rows or rows[0].get(STUDENT_REPLAYED):  # a stored student's curve: no Train run here
            continue
        for h in rows:
            intervals.append((h["epoch_started_at"], h["epoch_started_at"] + h["epoch_seconds"]))
            loop_seconds += h["epoch_seconds"]
            worker_rss.append(h["peak_rss_mb"])
            driver_rss.append(h["trial_driver_rss_mb"])
        if rows[0]["start_epoch"] == 1:
            latency = rows[0]["epoch_started_at"] - rows[0]["fit_called_at"]
            if rows[0].get("student_in_teacher_run"):
                latencies["student_after_teacher"].append(latency)
                runs.append(run_row(STUDENT_AFTER_TEACHER, rows, rows[0]["fit_called_at"]))
            else:
                latencies["student"].append(latency)
                parts["student"].append(start_parts(rows[0], rows[0]["fit_called_at"]))
                runs.append(run_row("student", rows, rows[0]["fit_called_at"]))
    # a sweep stopped before its end (a deadline's Ctrl-C outside Tune's run, a kill) may have
    # written no summary: its stored runs still count
    summary_file = experiment / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"trials": []}
    return {
        "intervals": intervals,
        "loop_seconds": loop_seconds,
        "latencies": latencies,
        "start_parts": parts,
        "runs": runs,
        "worker_rss_mb": max(worker_rss, default=math.nan),  # no epoch stored yet: no figure
        "driver_rss_mb": max(driver_rss, default=math.nan),
        "summary": summary,
    }


def run_row(role: str, history: list[dict], fit_called_at: float) -> dict:
    """One run's start split, compile seconds, and first epoch (and its eval) against the later ones (median)."""

    def later(key: str) -> float:
        values = [h[key] for h in history[1:] if key in h]
        return statistics.median(values) if values else math.nan

    return {
        "role": role,
        "split": start_split(history[0], fit_called_at, process_up=role == STUDENT_AFTER_TEACHER),
        "compile_seconds": history[0].get("compile_seconds", 0.0),
        "first_epoch_seconds": history[0]["epoch_seconds"],
        "later_epoch_seconds": later("epoch_seconds"),
        # the first eval of a compiled model compiles its eval graph too (older runs: NaN)
        "first_eval_seconds": history[0].get("eval_seconds", math.nan),
        "later_eval_seconds": later("eval_seconds"),
        "peak_gpu_memory_mb": max(
            (h["peak_gpu_memory_mb"] for h in history if "peak_gpu_memory_mb" in h), default=math.nan
        ),
    }


def refuse_errored(summary: dict) -> None:
    """A sweep with an errored trial did less work: its wall time compares with nothing."""
    errored = [r.get("trial_id", "?") for r in summary["trials"] if r["state"] == "ERROR"]
    if errored:
        raise SystemExit(f"sweep_overhead: trial(s) {', '.join(errored)} errored; no figures from this sweep")


def trials_at_a_time(console: str) -> int:
    """The concurrency the sweep ran at, from its first line ("sweep NAME: N trials, K at a time;
    ..."): the stored spec does not have it where gpus_per_worker: auto sized it."""
    found = re.search(r", (\d+) at a time; log ", console)
    if found is None:
        raise SystemExit("sweep_overhead: the sweep's console has no 'K at a time' line")
    return int(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "search_spaces" / "smoke.yaml"))
    parser.add_argument("--target", type=float, default=0.15, help="overhead target (fraction of wall time)")
    parser.add_argument("--log", type=Path, default=None, help="write the sweep's console here as it runs")
    args = parser.parse_args(argv)
    print(machine())
    with tempfile.TemporaryDirectory(prefix="remem-bench-") as tmp:
        root = Path(tmp) / "results"
        name = "bench-" + Path(args.spec).stem
        cmd = [
            sys.executable,
            "-m",
            "remem_ray.cli",
            "sweep",
            "run",
            str(Path(args.spec).absolute()),
            "--storage",
            str(root),
            "--name",
            name,
        ]
        began = time.time()
        # the console goes to a file as it runs: a sweep cut short by a time limit leaves its log
        log_path = args.log or Path(tmp) / "sweep-console.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - began
        if proc.returncode != 0:
            print(log_path.read_text()[-6000:])
            raise SystemExit(f"sweep failed with exit code {proc.returncode}")
        data = collect(root, name)
        refuse_errored(data["summary"])
        slots = trials_at_a_time(log_path.read_text())
    busy = covered_seconds(data["intervals"])
    overhead = 1.0 - busy / wall
    summary = data["summary"]
    lat = data["latencies"]
    rows = [
        ["measure", "value", "target", "verdict"],
        [
            f"overhead: wall time with no epoch running ({Path(args.spec).name})",
            f"{overhead:.1%}",
            f"< {args.target:.0%}",
            verdict(overhead, args.target),
        ],
        ["slot use: epoch time / (wall x concurrent trials)", f"{data['loop_seconds'] / (wall * slots):.1%}", "-", "-"],
        ["wall time / time covered by epochs", f"{wall:.0f} s / {busy:.0f} s", "-", "-"],
        [
            "Train-run start latency, teachers (median)",
            f"{statistics.median(lat['teacher']):.1f} s" if lat["teacher"] else "-",
            "-",
            "-",
        ],
        [
            "Train-run start latency, students in runs of their own (median)",
            f"{statistics.median(lat['student']):.1f} s" if lat["student"] else "-",
            "-",
            "-",
        ],
        [
            "student phase start in its teacher's run: phase switch -> first epoch (median)",
            f"{statistics.median(lat['student_after_teacher']):.1f} s" if lat["student_after_teacher"] else "-",
            "-",
            "-",
        ],
        *(
            [
                f"  {role}s: fit -> worker process / -> imports done / -> loop entered / -> first epoch (median)",
                " / ".join(f"{statistics.median(p[i] for p in data['start_parts'][role]):.1f} s" for i in range(4)),
                "-",
                "-",
            ]
            for role in ("teacher", "student")
            if data["start_parts"][role]
        ),
        [
            "teacher trainings / distinct teacher keys",
            f"{summary['teacher_trainings_performed']} / {summary['distinct_teacher_keys']}",
            "equal",
            "meets" if summary["teacher_trainings_performed"] == summary["distinct_teacher_keys"] else "MISSES",
        ],
        [
            "peak RSS: Train worker / trial driver",
            f"{data['worker_rss_mb']:.0f} MB / {data['driver_rss_mb']:.0f} MB",
            "-",
            "-",
        ],
    ]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
