"""Search efficiency (run once, recorded; not in CI): TPE + ASHA against the full grid.

1. `grid`: runs the whole rho x alpha x teacher-epoch grid of a sweep spec (every point as a
   points_to_evaluate entry, ASHA off) through `remem sweep run`, and saves each point's
   per-epoch student curve to a JSON table.
2. `replay`: replays the sweep's own searcher and scheduler (build_searcher / build_scheduler,
   seeded TPE, ASHA, the same num_samples and concurrency) on a local Ray with a trainable
   that reads the recorded curves instead of training - a tabular benchmark: identical
   configurations give identical curves, so only the search differs. Compute counts
   trial-epochs: each distinct teacher's epochs once, plus the student epochs each trial ran.

    python -m benchmarks.search_efficiency grid --spec search_spaces/default.yaml --out grid.json
    python -m benchmarks.search_efficiency replay --spec search_spaces/default.yaml --table grid.json --seeds 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.harness import machine, table
from remem_ray.contract import EPOCH, EPOCHS, METRIC

ROOT = Path(__file__).resolve().parents[1]


def point_key(rho: float, alpha: float, teacher_epoch: int) -> str:
    return f"{float(rho):g}/{float(alpha):g}/{int(teacher_epoch)}"


def grid_points(spec: dict) -> list[dict]:
    search = spec["sweep"]["search"]
    epochs = search.get("teacher_epoch") or spec["teacher"]["checkpoint_epochs"]
    return [
        {"rho": r, "alpha": a, "teacher_epoch": e}
        for r, a, e in itertools.product(search["rho"]["values"], search["alpha"]["values"], epochs)
    ]


def run_grid(spec_path: str, out: str) -> None:
    spec = yaml.safe_load(Path(spec_path).read_text())
    points = grid_points(spec)
    spec["sweep"].update(num_samples=len(points), points_to_evaluate=points, asha={"enabled": False})
    spec["name"] = f"grid-{spec['name']}"
    with tempfile.TemporaryDirectory(prefix="remem-grid-") as tmp:
        spec["storage"] = {"root": str(Path(tmp) / "results")}
        grid_spec = Path(tmp) / "grid.yaml"
        grid_spec.write_text(yaml.safe_dump(spec))
        subprocess.run([sys.executable, "-m", "remem_ray.cli", "sweep", "run", str(grid_spec)], cwd=tmp, check=True)
        experiment = Path(tmp) / "results" / "sweeps" / spec["name"]
        curves = {}
        for result_file in sorted(experiment.glob("trial_*/result.json")):
            rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
            params = json.loads((result_file.parent / "params.json").read_text())
            curves[point_key(params["rho"], params["alpha"], params["teacher_epoch"])] = [r[METRIC] for r in rows]
    record = {
        "spec": spec_path,
        "teacher_epochs": spec["teacher"]["epochs"],
        "student_epochs": spec["student"]["epochs"],
        "curves": curves,
    }
    Path(out).write_text(json.dumps(record, indent=1))
    print(f"{len(curves)} grid points recorded in {out}")


def table_trial(config: dict, curves: dict) -> None:
    from ray import tune

    curve = curves[point_key(config["rho"], config["alpha"], config["teacher_epoch"])]
    for epoch, value in enumerate(curve, start=1):
        # the keys a student's epoch reports: ASHA's rungs and the searcher's steps are "epoch"
        tune.report({METRIC: value, EPOCH: epoch, EPOCHS: len(curve)})


def replay(spec_path: str, table_path: str, seeds: int) -> None:
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import tune

    from remem_ray.config import load_sweep_spec
    from remem_ray.sweep.search import build_scheduler, build_searcher

    record = json.loads(Path(table_path).read_text())
    curves, t_epochs = record["curves"], record["teacher_epochs"]
    grid_best = max(c[-1] for c in curves.values())
    grid_compute = len({k.rsplit("/", 1)[0] for k in curves}) * t_epochs + sum(len(c) for c in curves.values())
    rows = [
        [
            "seed",
            "best found",
            "compute to reach grid best",
            "total compute",
            "fraction of grid",
            "distinct points",
            "duplicates answered",
        ]
    ]
    reached = []
    with tempfile.TemporaryDirectory(prefix="remem-replay-") as tmp:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            _temp_dir=str(Path(tmp) / "ray"),
            num_cpus=2,
            logging_level="ERROR",
            log_to_driver=False,
        )
        try:
            for seed in range(seeds):
                spec = load_sweep_spec(spec_path, {"sweep.seed": seed, "storage.root": str(Path(tmp) / "r")})
                if spec.sweep.resources.auto_roles():  # sized on a cluster's GPUs; this replays a table
                    raise SystemExit("search_efficiency: give a spec whose gpus_per_worker are numbers, not auto")
                searcher = build_searcher(spec)
                tuner = tune.Tuner(
                    tune.with_parameters(table_trial, curves=curves),
                    tune_config=tune.TuneConfig(
                        search_alg=searcher,
                        scheduler=build_scheduler(spec),
                        num_samples=spec.sweep.num_samples,  # concurrency: the searcher's slots, as in a sweep
                    ),
                    run_config=tune.RunConfig(name=f"replay-{seed}", storage_path=str(Path(tmp) / "tune"), verbose=0),
                )
                results = sorted(tuner.fit(), key=lambda r: r.metrics.get("timestamp", 0))
                compute, seen, best, reach = 0, set(), 0.0, None
                for result in results:
                    c = result.config
                    teacher = point_key(c["rho"], c["alpha"], 0).rsplit("/", 1)[0]
                    if teacher not in seen:
                        seen.add(teacher)
                        compute += t_epochs
                    compute += int(result.metrics["training_iteration"])
                    best = max(best, result.metrics[METRIC])
                    if reach is None and best >= grid_best:
                        reach = compute
                reached.append(reach)
                rows.append(
                    [
                        str(seed),
                        f"{best:.4f}",
                        "-" if reach is None else str(reach),
                        str(compute),
                        "-" if reach is None else f"{reach / grid_compute:.2f}",
                        str(
                            len(
                                {
                                    point_key(r.config["rho"], r.config["alpha"], r.config["teacher_epoch"])
                                    for r in results
                                }
                            )
                        ),
                        str(searcher.ledger.answered),
                    ]
                )
        finally:
            ray.shutdown()
    print(machine())
    print(f"grid: {len(curves)} points, best student val {grid_best:.4f}, compute {grid_compute} trial-epochs")
    print(table(rows))
    hits = [r for r in reached if r is not None]
    within = sum(1 for r in hits if r <= grid_compute / 3)
    print(
        f"reached the grid's best in {len(hits)}/{seeds} seeds; within a third of the grid's compute in "
        f"{within}/{seeds}; median compute when reached: "
        f"{statistics.median(hits) if hits else float('nan')} trial-epochs"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--spec", default=str(ROOT / "search_spaces" / "default.yaml"))
    g.add_argument("--out", default="grid.json")
    r = sub.add_parser("replay")
    r.add_argument("--spec", default=str(ROOT / "search_spaces" / "default.yaml"))
    r.add_argument("--table", default="grid.json")
    r.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.verb == "grid":
        run_grid(args.spec, args.out)
    else:
        replay(args.spec, args.table, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
