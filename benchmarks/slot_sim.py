"""A sweep's GPU slots, simulated in seconds without Ray: the share of the GPU budget its Train
runs hold over the sweep, under the driver's own slot policy and run-slot book (sweep/slots.py,
sweep/run_slots.py), counting runs (max_concurrent_trials) against weighing them by their GPUs
(gpu_budget), side by side on the same trials.

Each trial's teacher key is drawn from `--keys` keys (the teacher epochs of one key share its
training); the first live trial of a key trains it, the others wait holding nothing; then each
distils. Run lengths are hours of simulated time; nothing is timed.

    python -m benchmarks.slot_sim --spec search_spaces/cifar100_vit_b.yaml --keys 16 --teacher-h 6 --student-h 2
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import table
from remem_ray.config import SweepSpec, load_sweep_spec
from remem_ray.sweep.run_slots import RunSlotBook
from remem_ray.sweep.slots import SlotMeasure, SlotPolicy, driver_limit, measure_of

STEP_S = 20.0  # a waiting trial asks the book again this often (it asks every second for real)


@dataclass
class SimTrial:
    trial_id: str
    key: str
    state: str = "waiting"  # waiting -> teacher -> training -> student -> distilling -> done
    ends_at: float = 0.0


@dataclass(frozen=True)
class SimResult:
    hours: float
    busy_share: float  # GPU-hours of runs over budget x hours
    teachers_trained: int


def simulate(spec: SweepSpec, measure: SlotMeasure, keys: list[str], teacher_h: float, student_h: float) -> SimResult:
    """Run the trials (one per entry of `keys`) to the end under `measure`."""
    res = spec.sweep.resources
    gpus = {role: getattr(res, role).num_workers * getattr(res, role).gpus() for role in ("teacher", "student")}
    stored: set[str] = set()
    with driver_limit(spec, measure):  # as the driver sets it
        policy = SlotPolicy(spec)
    policy.is_stored = stored.__contains__  # type: ignore[method-assign]
    now = [0.0]
    book = RunSlotBook(measure, stale_after_s=3600.0, clock=lambda: now[0])
    pending = [SimTrial(f"t{i}", key) for i, key in enumerate(keys)]
    live: list[SimTrial] = []
    gpu_seconds, trained = 0.0, 0
    while pending or live:
        while pending and policy.may_start([t.key for t in live]):
            live.append(pending.pop(0))
        for trial in list(live):
            if trial.state == "waiting":
                if trial.key in stored:
                    trial.state = "student"
                elif not any(t.key == trial.key and t.state in ("teacher", "training") for t in live):
                    trial.state = "teacher"  # the key's trainer: the first live trial without one
            if trial.state in ("teacher", "student") and book.take(trial.trial_id, trial.state):
                hours = teacher_h if trial.state == "teacher" else student_h
                trial.state, trial.ends_at = (
                    ("training" if trial.state == "teacher" else "distilling"),
                    now[0] + hours * 3600,
                )
            elif trial.state in ("training", "distilling"):
                book.renew(trial.trial_id, "teacher" if trial.state == "training" else "student")
                gpu_seconds += gpus["teacher" if trial.state == "training" else "student"] * STEP_S
                if now[0] + STEP_S >= trial.ends_at:
                    book.release(trial.trial_id)
                    if trial.state == "training":
                        stored.add(trial.key)
                        trained += 1
                        trial.state = "student"
                    else:
                        live.remove(trial)
        now[0] += STEP_S
    budget = res.gpu_budget or measure.capacity * max(gpus.values())
    return SimResult(now[0] / 3600, gpu_seconds / (budget * now[0]), trained)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="search_spaces/cifar100_vit_b.yaml")
    parser.add_argument("--keys", type=int, default=16, help="distinct teachers the trials draw from")
    parser.add_argument("--teacher-h", type=float, default=6.0)
    parser.add_argument("--student-h", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = load_sweep_spec(Path(args.spec))
    draw = random.Random(args.seed)
    keys = [f"k{draw.randrange(args.keys)}" for _ in range(spec.sweep.num_samples)]
    weighed = measure_of(spec)
    counted = SlotMeasure(float(weighed.fewest_trials()))  # what the same budget allowed, counting runs
    rows = []
    for name, measure in (("runs counted", counted), ("GPUs weighed", weighed)):
        result = simulate(spec, measure, keys, args.teacher_h, args.student_h)
        rows.append(
            [name, measure.describe(), f"{result.hours:.1f}", f"{result.busy_share:.2f}", result.teachers_trained]
        )
    print(
        f"{spec.sweep.num_samples} trials over {args.keys} teacher keys, teacher {args.teacher_h:g} h, "
        f"student {args.student_h:g} h, budget {spec.sweep.resources.gpu_budget} GPUs"
    )
    print(
        table([["slots", "limit", "hours", "GPU-busy share", "teachers trained"], *[[str(c) for c in r] for r in rows]])
    )


if __name__ == "__main__":
    main()
