"""Sweeps run as `remem` processes, as a user runs them, and what they leave in storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.servers import ProcessTree
from remem_ray.sweep.tune_adapter import study_from_searcher_state

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def remem_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "REMEM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    )
    env.update(extra or {})
    return env


def start_remem(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, ProcessTree]:
    log = open(cwd / f"remem-{int(time.time() * 1000)}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "remem_ray.cli", *args],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    proc.log_path = Path(log.name)
    return proc, ProcessTree(proc.pid)


def run_remem(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 400) -> tuple[int, str]:
    proc, tree = start_remem(args, cwd, env)
    try:
        proc.wait(timeout)
    finally:
        tree.kill_all()
    return proc.returncode, proc.log_path.read_text()


def experiment_trials(experiment: Path) -> dict[str, dict]:
    """Trial id -> {status, last_result} from Tune's newest experiment state file."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for trial_json, runtime in data["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = {
            "status": trial["status"],
            "last_result": json.loads(runtime).get("last_result") or {},
        }
    return out


def student_checkpoint_epoch(experiment: Path, trial_id: str) -> int:
    """The epoch of the newest checkpoint a trial's student Train run has registered (0 if none).

    Read from Train's own checkpoint manager snapshot: a checkpoint folder uploaded by a worker
    but not yet registered by the controller is not one Train resumes from.
    """
    snapshot = experiment / "train-runs" / f"student-{trial_id}" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, json.JSONDecodeError):
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def searcher_study(experiment: Path):
    state = sorted(experiment.glob("searcher-state-*.pkl"))[-1]
    return study_from_searcher_state(state.read_bytes())


def stored_study(experiment: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")
