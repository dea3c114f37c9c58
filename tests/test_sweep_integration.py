"""End-to-end sweeps on a real local Ray (127.0.0.1, dashboard on), local storage and SeaweedFS.

Each sweep runs as a `remem` process in its own session; every process it starts is recorded
and ended by PID afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from servers import ProcessTree, SeaweedFS, sigkill

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

pytestmark = pytest.mark.integration


def _env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "REMEM_CACHE_DIR": str(tmp_path / "cache"),
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start_remem(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, ProcessTree]:
    log = open(cwd / f"remem-{int(time.time() * 1000)}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "remem_ray.cli", *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    proc.log_path = Path(log.name)
    return proc, ProcessTree(proc.pid)


def run_remem(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 400) -> tuple[int, str]:
    proc, tree = start_remem(args, cwd, env)
    try:
        proc.wait(timeout)
    finally:
        tree.kill_all()
    return proc.returncode, proc.log_path.read_text()


def _experiment_trials(experiment: Path) -> dict[str, dict]:
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
        out[trial["trial_id"]] = {"status": trial["status"],
                                  "last_result": json.loads(runtime).get("last_result") or {}}
    return out


def _student_checkpoint_epoch(experiment: Path, trial_id: str) -> int:
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


def _study(experiment: Path):
    state = sorted(experiment.glob("searcher-state-*.pkl"))[-1]
    with open(state, "rb") as f:
        return pickle.load(f)["_ot_study"]


def _check_summary(summary: dict, num_trials: int) -> None:
    rows = summary["trials"]
    assert len(rows) == num_trials
    assert all(r["state"] == "TERMINATED" for r in rows), rows
    keys = {r["teacher_key"] for r in rows}
    assert summary["distinct_teacher_keys"] == len(keys)
    # every distinct teacher trained exactly once; every other trial reused one
    assert summary["teacher_trainings_performed"] == len(keys)
    assert summary["teacher_reuses"] == num_trials - len(keys) >= 1
    assert sum(r["teacher_trained"] for r in rows) == len(keys)
    best = summary["best"]
    assert best["student_val_acc"] == max(r["student_val_acc"] for r in rows)
    assert best["student_val_acc"] > 0.3  # digits, 10 classes: the students learned
    assert {"rho", "alpha", "teacher_epoch"} <= set(best["params"])


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _check_report(experiment: Path) -> None:
    from remem_ray.report import PLOTS

    report = (experiment / "report.md").read_text()
    for name in PLOTS.values():
        assert _png_size(experiment / name) == (640, 480)
        assert f"]({name})" in report
        assert (experiment / name).stat().st_size > 5000  # drawn, not blank


def test_smoke_sweep_local_end_to_end(tmp_path):
    env = _env(tmp_path)
    rc, out = run_remem(["sweep", "run", str(SMOKE), "--storage", str(tmp_path / "results")], tmp_path, env)
    assert rc == 0, out[-3000:]
    root = tmp_path / "results"
    experiment = root / "sweeps" / "smoke"
    summary = json.loads((experiment / "summary.json").read_text())
    _check_summary(summary, 4)
    assert "best student checkpoint:" in out and "teacher trainings performed: 2" in out

    # objects written: Tune experiment, teacher registry, students
    assert (experiment / "tuner.pkl").is_file() and (experiment / "sweep_spec.json").is_file()
    for key in {r["teacher_key"] for r in summary["trials"]}:
        teacher = root / "teachers" / key
        assert json.loads((teacher / "spec.json").read_text())["teacher_key"] == key
        for epoch in (2, 4):
            manifest = json.loads((teacher / f"epoch_{epoch}" / "manifest.json").read_text())
            assert set(manifest["files"]) == {"model.pt", "meta.json"}
        assert (teacher / "train-run").is_dir()
    for row in summary["trials"]:
        assert (experiment / "students" / row["trial_id"] / "best" / "manifest.json").is_file()
        assert not any(len(p.name) > 60 for p in experiment.iterdir())  # no constants in trial folder names

    # the Optuna study: ASHA-stopped trials are PRUNED, the others COMPLETE
    study = _study(experiment)
    assert len(study.trials) == 4
    states = {r["trial_id"]: r["stopped_early"] for r in summary["trials"]}
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    assert pruned == sum(states.values())
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert study.trials[0].params["rho"] == 0.0 and study.trials[0].params["teacher_epoch"] == 4  # enqueued

    # the report: five PNG plots of the expected size, linked from report.md
    assert f"report: {experiment}/report.md" in out
    _check_report(experiment)
    (experiment / "report.md").unlink()
    rc, out = run_remem(["report", "smoke", "--storage", str(root)], tmp_path, env, timeout=120)
    assert rc == 0 and str(experiment / "report.md") in out
    _check_report(experiment)

    # status / best read storage only; a second run with the same name refuses
    rc, out = run_remem(["sweep", "status", "smoke", "--storage", str(root)], tmp_path, env, timeout=120)
    assert rc == 0 and all(r["trial_id"] in out for r in summary["trials"])
    rc, out = run_remem(["sweep", "best", str(experiment)], tmp_path, env, timeout=120)
    assert rc == 0
    best = json.loads(out[out.index("{"):])
    assert best["trial_id"] == summary["best"]["trial_id"] and Path(best["student_checkpoint"]).is_dir()
    rc, out = run_remem(["sweep", "run", str(SMOKE), "--storage", str(root)], tmp_path, env, timeout=120)
    assert rc == 2 and "already exists" in out and "remem sweep resume smoke" in out


@pytest.fixture
def seaweed(tmp_path):
    server = SeaweedFS(tmp_path / "seaweed")
    server.start()
    yield server
    server.stop()


def test_smoke_sweep_on_s3(tmp_path, seaweed):
    client = seaweed.client()
    client.create_bucket(Bucket="remem")
    env = _env(tmp_path, seaweed.env())
    rc, out = run_remem(["sweep", "run", str(SMOKE), "--storage", "s3://remem/exp", "--endpoint",
                         seaweed.endpoint], tmp_path, env)
    assert rc == 0, out[-3000:]
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="remem", Prefix="exp/")
            for o in page.get("Contents", [])]
    summary = json.loads(client.get_object(Bucket="remem", Key="exp/sweeps/smoke/summary.json")["Body"].read())
    _check_summary(summary, 4)
    assert "exp/sweeps/smoke/tuner.pkl" in keys
    for key in {r["teacher_key"] for r in summary["trials"]}:
        for epoch in (2, 4):
            assert f"exp/teachers/{key}/epoch_{epoch}/manifest.json" in keys
    for row in summary["trials"]:
        assert f"exp/sweeps/smoke/students/{row['trial_id']}/best/model.pt" in keys
        run = f"exp/sweeps/smoke/train-runs/student-{row['trial_id']}"
        assert any(k.startswith(f"{run}/checkpoint_") and k.endswith("/state.pt") for k in keys)
        # Train keeps the newest two (its bookkeeping; deleted folders can linger in a listing on SeaweedFS)
        snapshot = json.loads(client.get_object(Bucket="remem", Key=f"{run}/checkpoint_manager_snapshot.json")
                              ["Body"].read())
        assert 1 <= len(snapshot["checkpoint_results"]) <= 2
    assert not (tmp_path / "remem-results").exists()  # nothing fell back to local storage
    rc, out = run_remem(["sweep", "status", "s3://remem/exp/sweeps/smoke", "--endpoint", seaweed.endpoint],
                        tmp_path, env, timeout=120)
    assert rc == 0 and summary["best"]["trial_id"] in out


def test_resume_after_driver_sigkill(tmp_path):
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "resume"
    spec["student"]["epochs"] = 6
    spec["sweep"].update(num_samples=3, asha={"enabled": False})
    spec["storage"]["root"] = str(tmp_path / "results")
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    experiment = tmp_path / "results" / "sweeps" / "resume"
    env = _env(tmp_path)

    proc, tree = start_remem(["sweep", "run", str(path)], tmp_path, env)
    finished, interrupted = set(), None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            trials = _experiment_trials(experiment)
            finished = {t for t, s in trials.items() if s["status"] == "TERMINATED"}
            running = [t for t, s in trials.items() if s["status"] == "RUNNING"
                       and 1 <= _student_checkpoint_epoch(experiment, t) <= 3]
            if finished and running:
                interrupted = running[0]
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            sigkill(proc.pid)
        tree.kill_all()
    assert interrupted is not None, proc.log_path.read_text()[-3000:]
    done_at_kill = _student_checkpoint_epoch(experiment, interrupted)
    results_before = {t: (experiment / f"trial_{t}" / "result.json").read_text() for t in finished}
    study_before = _study(experiment)

    rc, out = run_remem(["sweep", "resume", "resume", "--storage", str(tmp_path / "results")], tmp_path, env)
    assert rc == 0, out[-3000:]
    summary = json.loads((experiment / "summary.json").read_text())
    assert len(summary["trials"]) == 3 and all(r["state"] == "TERMINATED" for r in summary["trials"])
    # no finished trial ran again
    for t in finished:
        assert (experiment / f"trial_{t}" / "result.json").read_text() == results_before[t]
    # the interrupted trial's Train run continued from its last checkpoint
    lines = [json.loads(line) for line in (experiment / f"trial_{interrupted}" / "result.json").read_text().split("\n")
             if line.strip()]
    resumed = [r for r in lines if r["start_epoch"] > 1]
    assert resumed, lines
    assert resumed[0]["start_epoch"] == done_at_kill + 1
    assert resumed[0]["epoch"] == done_at_kill + 1
    assert lines[-1]["epoch"] == 6
    # the Optuna study continued: same early trials, numbers 0..n-1, nothing asked twice
    study = _study(experiment)
    assert [t.number for t in study.trials] == list(range(len(study.trials))) and len(study.trials) == 3
    for old, new in zip(study_before.trials, study.trials):
        assert old.params == new.params
    assert all(t.state.name == "COMPLETE" for t in study.trials)
