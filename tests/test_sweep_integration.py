"""End-to-end sweeps on a real local Ray (127.0.0.1, dashboard on), local storage and SeaweedFS.

Each sweep runs as a `remem` process in its own session; every process it starts is recorded
and ended by PID afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.exports import score_in_fresh_process
from helpers.servers import BystanderRay, RayHead, SeaweedFS, free_port
from helpers.sweeps import SMOKE, remem_env, run_remem, searcher_study, start_remem, stored_study

from remem_ray.checkpoint_files import best_checkpoint
from remem_ray.contract import METRIC
from remem_ray.leases import current_record, process_gone
from remem_ray.storage import Storage
from remem_ray.sweep.registry import TeacherRegistry
from remem_ray.sweep.students import StudentRegistry

pytestmark = pytest.mark.integration


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


def _teacher_epochs(lines: list[str]) -> dict[str, set[int]]:
    """{teacher key: the epochs with a line} of lines "... teacher <key>: epoch <e>/<n> ..."."""
    epochs: dict[str, set[int]] = {}
    for m in (re.search(r" teacher (\w+): epoch (\d+)/\d+ ", line) for line in lines):
        if m:
            epochs.setdefault(m[1], set()).add(int(m[2]))
    return epochs


def _check_console(out: str, experiment: Path, stopped: int) -> None:
    """Epoch lines, none twice: every student epoch, a teacher's first, saved and last (the smoke
    teachers: 4 epochs, saved 2 and 4; epoch 3 only if a minute passed since epoch 2's line), the
    log every epoch; Ray's per-epoch chatter only in sweep.log; the last progress line has the
    final counts."""
    epoch_lines = [line.split("] ", 1)[1] for line in out.splitlines() if "epoch " in line and ": epoch " in line]
    assert len(epoch_lines) == len(set(epoch_lines)) > 0, epoch_lines
    shown = _teacher_epochs(epoch_lines)
    assert len(shown) == 2 and all({1, 2, 4} <= epochs <= {1, 2, 3, 4} for epochs in shown.values()), shown
    assert _teacher_epochs((experiment / "sweep.log").read_text().splitlines()) == {k: {1, 2, 3, 4} for k in shown}
    assert "TrainingReport(" not in out and "Checkpoint successfully created" not in out
    assert "Configuration for experiment" not in out and "tensorboard --logdir" not in out
    progress = [line for line in out.splitlines() if "] progress " in line]
    # the third point is stopped by design; the first may be too, when the second reaches the rung first
    final = f"trials 4/4 done ({stopped} stopped early), 0 failed, 0 running, 0 pending | teachers 2 trained, 2 reused"
    assert progress and f"{final} | best student val " in progress[-1], progress
    reused = re.findall(r"trial \w+: teacher \w+ is stored \(trained by trial \w+\); distilling from epoch \d", out)
    assert len(reused) == 2, reused  # each reuse says where its teacher came from
    log = (experiment / "sweep.log").read_text()
    assert "TrainingReport(" in log and all(line in log for line in epoch_lines)  # everything is kept there
    # each Train worker names its trial once, in the log: the console names the trial on its tracebacks
    worker_line = r"\(RayTrainWorker pid=\d+\) trial [0-9a-f]{8} (?:teacher \w+|student): worker rank 0 of 1"
    announced = re.findall(worker_line, log)
    assert len(announced) >= 4 and "worker rank" not in out, announced


def _tensorboard_series(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _check_dashboard(root: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """`remem sweep dashboard` serves the stored study over HTTP on 127.0.0.1."""
    import urllib.request

    port = free_port()
    proc, tree = start_remem(
        ["sweep", "dashboard", "smoke", "--storage", str(root), "--port", str(port)], tmp_path, env
    )
    try:
        body = None

        def served() -> bool:
            nonlocal body
            assert proc.poll() is None, proc.log_path.read_text()[-2000:]
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read()
            except OSError:
                return False
            return True

        _wait_for(served, 60, "the dashboard to answer")
        assert json.loads(body)["study_summaries"][0]["study_name"] == "smoke"
    finally:
        tree.kill_all()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _check_report(experiment: Path) -> None:
    from remem_ray.sweep.report import PLOTS

    report = (experiment / "report.md").read_text()
    for name in PLOTS.values():
        assert _png_size(experiment / name) == (640, 480)
        assert f"]({name})" in report
        assert (experiment / name).stat().st_size > 5000  # drawn, not blank


def test_smoke_sweep_local_end_to_end(tmp_path):
    """The smoke sweep beside another Ray on the host (an everyday setup): every process of the
    sweep addresses its own cluster, and the runs the scheduler stopped give their resources back."""
    env = remem_env(tmp_path)
    with BystanderRay(tmp_path):
        rc, out = run_remem(["sweep", "run", str(SMOKE), "--storage", str(tmp_path / "results")], tmp_path, env)
    assert rc == 0, out[-3000:]
    root = tmp_path / "results"
    experiment = root / "sweeps" / "smoke"
    summary = json.loads((experiment / "summary.json").read_text())
    _check_summary(summary, 4)
    log = (experiment / "sweep.log").read_text()
    assert "multiple active Ray instances" not in out + log and "waiting for 1 workers" not in log
    # Train's cleaner found each stopped run's controller gone and freed its placement group
    cleaned = log.count("Cleaning up placement group")
    assert cleaned >= sum(r["stopped_early"] for r in summary["trials"]) >= 1, cleaned
    assert "best student checkpoint:" in out and "teachers trained: 2" in out
    _check_console(out, experiment, stopped=sum(r["stopped_early"] for r in summary["trials"]))

    # objects written: Tune experiment, teacher registry, students
    assert (experiment / "tuner.pkl").is_file() and (experiment / "sweep_spec.json").is_file()
    # digits and no weights files: nothing to identify, the keys earlier versions gave
    nothing = {"data.root": None, "teacher.weights": None, "student.weights": None}
    assert json.loads((experiment / "inputs.json").read_text()) == nothing
    registry = TeacherRegistry(Storage(str(root / "teachers")))
    for key in {r["teacher_key"] for r in summary["trials"]}:
        teacher = Path(registry.set_in_use(key).uri())  # the folder of the generation that trained it
        assert teacher.parent == root / "teachers" / key
        assert json.loads((teacher / "spec.json").read_text())["teacher_key"] == key
        for epoch in (2, 4):
            manifest = json.loads((teacher / f"epoch_{epoch}" / "manifest.json").read_text())
            assert set(manifest["files"]) == {"model.pt", "meta.json"}
        assert (teacher / "resume" / "state.pt").is_file()  # its resume state, for whoever trains it next
    for row in summary["trials"]:
        best = best_checkpoint(Storage(str(experiment / "students" / row["trial_id"])))
        assert best is not None and (Path(best) / "manifest.json").is_file()
        assert not any(len(p.name) > 60 for p in experiment.iterdir())  # no constants in trial folder names

    # the Optuna study, as Tune keeps it and as Optuna's own tools open it: ASHA-stopped trials
    # are PRUNED (the third point by design), the others COMPLETE, with per-epoch values
    for study in (searcher_study(experiment), stored_study(experiment, "smoke")):
        assert len(study.trials) == 4
        states = {r["trial_id"]: r["stopped_early"] for r in summary["trials"]}
        pruned = [t for t in study.trials if t.state.name == "PRUNED"]
        assert len(pruned) == sum(states.values()) >= 1
        assert any(t.number == 2 and t.params["student_lr"] == 0.00001 for t in pruned)
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
        assert study.trials[0].params["rho"] == 0.0 and study.trials[0].params["teacher_epoch"] == 4  # enqueued
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert all(sorted(t.intermediate_values) == [1, 2] and t.value > 0.3 for t in complete)

    # TensorBoard: each Train run's per-epoch scalars under the sweep folder
    best = summary["best"]["trial_id"]
    val = _tensorboard_series(experiment / "tensorboard" / f"trial_{best}_student", "accuracy/val")
    assert [step for step, _ in val] == [1, 2, 3]
    assert max(v for _, v in val) == pytest.approx(summary["best"]["student_val_acc"], abs=1e-6)  # float32 events
    for key in {r["teacher_key"] for r in summary["trials"]}:
        assert [s for s, _ in _tensorboard_series(experiment / "tensorboard" / f"teacher_{key}", "loss/train")] == [
            1,
            2,
            3,
            4,
        ]
    _check_dashboard(root, tmp_path, env)

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
    best = json.loads(out[out.index("{") :])
    assert best["trial_id"] == summary["best"]["trial_id"] and Path(best["student_checkpoint"]).is_dir()
    rc, out = run_remem(["sweep", "run", str(SMOKE), "--storage", str(root)], tmp_path, env, timeout=120)
    assert rc == 2 and "already exists" in out and f"remem sweep resume {experiment}" in out
    _check_export(root, summary, tmp_path, env)
    _check_second_sweep_replays(root, summary, tmp_path, env)


def _point(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _curves(experiment: Path) -> dict[str, dict[int, float]]:
    """Trial id -> {epoch: the metric it reported}, from Tune's result files."""
    curves = {}
    for result_file in experiment.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        curves[result_file.parent.name[len("trial_") :]] = {r["epoch"]: r[METRIC] for r in rows if METRIC in r}
    return curves


def _check_second_sweep_replays(root: Path, first: dict, tmp_path: Path, env: dict) -> None:
    """The smoke sweep again on the same root under another name: a student the first finished is
    replayed (no Train run: none in its folder), one the first's scheduler stopped is distilled
    again; every point reports the first's curve, to Tune and to Optuna, epoch for epoch."""
    # Released by each trial, the ones the scheduler stopped included; or, where Tune ended a stopped
    # trial's process before its heartbeat's release landed (a loaded machine), held by a process
    # that has ended, which a waiter on this host takes at once (the second sweep checks no wait)
    for row in first["trials"]:
        record = current_record(Storage(str(root / "students" / row["student_key"] / "lease")))
        assert record.released or process_gone(record), row
    # the teacher checkpoint the by-design stopped point distils from, truncated after its manifest:
    # that student is not stored, so the second sweep distils it again and must find the damage
    stopped = next(r for r in first["trials"] if r["params"]["student_lr"] == 0.00001)
    registry = TeacherRegistry(Storage(str(root / "teachers")))
    first_set = Path(registry.set_in_use(stopped["teacher_key"]).uri())
    model_file = first_set / f"epoch_{stopped['params']['teacher_epoch']}" / "model.pt"
    truncated = model_file.read_bytes()[: model_file.stat().st_size // 2]
    model_file.write_bytes(truncated)
    # what the first sweep stored, read before the second adds its own: every point it finished,
    # and any point the scheduler stopped whose run still reached its last epoch before the stop
    # ended it (timing, seen on a loaded machine: that student is whole and is replayed too)
    by_point = {_point(r["params"]): r for r in first["trials"]}
    students = StudentRegistry(Storage(str(root / "students")))
    finished = {p for p, r in by_point.items() if students.newest(r["student_key"]) is not None}
    assert finished >= {p for p, r in by_point.items() if not r["stopped_early"]}
    if _point(stopped["params"]) in finished:  # the same race for the by-design stopped point (one epoch
        # to go): a stored student that fails its sha256 check is distilled again, so damage it too,
        # and the second sweep still reads the truncated teacher
        stored = students.newest(stopped["student_key"])
        weights = Path(stored.checkpoint_uri()) / "model.pt"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        finished.discard(_point(stopped["params"]))
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "smoke-again"
    path = tmp_path / "smoke-again.yaml"
    path.write_text(yaml.safe_dump(spec))
    rc, out = run_remem(["sweep", "run", str(path), "--storage", str(root)], tmp_path, env)
    assert rc == 0, out[-3000:]
    experiment = root / "sweeps" / "smoke-again"
    second = json.loads((experiment / "summary.json").read_text())
    assert sorted(by_point) == sorted(_point(r["params"]) for r in second["trials"])  # the same points
    replayed = {r["trial_id"] for r in second["trials"] if _point(r["params"]) in finished}
    assert {r["trial_id"] for r in second["trials"] if r["student_replayed"]} == replayed and replayed
    runs = {p.name for p in (experiment / "train-runs").iterdir()} if (experiment / "train-runs").exists() else set()
    assert runs == {f"student-{r['trial_id']}" for r in second["trials"] if r["trial_id"] not in replayed}
    assert second["students_replayed"] == len(replayed)
    # the damage: found before use (sha256), counted once, retrained beside the set in use (readers
    # may be in it), which is never rewritten; the retrained teacher is the same, bit for bit, so
    # the student distilled from it reports the first sweep's curve (checked below)
    assert "does not match its sha256" in out and "again into" in out
    assert second["teacher_trainings_performed"] == second["corrupt_checkpoints_retrained"] == 1
    (event,) = second["integrity_events"]
    assert event["teacher_key"] == stopped["teacher_key"] and event["epoch"] == stopped["params"]["teacher_epoch"]
    retrained = Path(registry.set_in_use(stopped["teacher_key"]).uri())
    assert retrained != first_set and retrained.parent == first_set.parent
    manifest = json.loads((retrained / model_file.parent.name / "manifest.json").read_text())
    assert (
        hashlib.sha256((retrained / model_file.parent.name / "model.pt").read_bytes()).hexdigest()
        == (manifest["files"]["model.pt"])
    )
    assert model_file.read_bytes() == truncated and (retrained / "resume" / "state.pt").is_file()
    assert f"students {len(replayed)} replayed" in out and "replaying its 3 epochs" in out
    assert "waiting for student" not in out  # no lease left behind by a stopped trial
    # the same curve epoch by epoch (a scheduler may stop a point at another rung in either sweep)
    first_curves, second_curves = _curves(root / "sweeps" / "smoke"), _curves(experiment)
    first_study = stored_study(root / "sweeps" / "smoke", "smoke")
    first_values = {_point(t.params): t.intermediate_values for t in first_study.trials}
    for row in second["trials"]:
        original = by_point[_point(row["params"])]
        mine, theirs = second_curves[row["trial_id"]], first_curves[original["trial_id"]]
        common = sorted(set(mine) & set(theirs))
        assert common and [mine[e] for e in common] == [theirs[e] for e in common], row
        if row["stopped_early"] == original["stopped_early"]:
            same = ("student_val_acc", "student_test_acc", "teacher_val_acc", "teacher_mi", "epochs_done", "state")
            assert {k: row[k] for k in same} == {k: original[k] for k in same}
    for trial in stored_study(experiment, "smoke-again").trials:
        theirs = first_values[_point(trial.params)]
        common = sorted(set(trial.intermediate_values) & set(theirs))
        assert common and all(trial.intermediate_values[e] == theirs[e] for e in common)
    for trial_id in replayed:  # its student is the stored one, whole; ASHA never stops a replay early
        best = best_checkpoint(Storage(str(experiment / "students" / trial_id)))
        row = next(r for r in second["trials"] if r["trial_id"] == trial_id)
        assert best is not None and not row["stopped_early"], row
        assert Path(best).parent.parent.parent == root / "students" and (Path(best) / "manifest.json").is_file()


def _check_export(root: Path, summary: dict, tmp_path: Path, env: dict) -> None:
    """The best student exported for timm and ONNX: a fresh process that never imports remem_ray
    scores the sweep's test split as the sweep recorded it."""
    from remem_ray.config import load_sweep_spec
    from remem_ray.data import build_datasets

    shipped = tmp_path / "shipped"
    args = ["sweep", "export", "smoke", "--storage", str(root), "--to", str(shipped), "--onnx"]
    rc, out = run_remem(args, tmp_path, env, timeout=300)
    assert rc == 0, out[-3000:]
    assert f'timm.create_model("local-dir:{shipped}", pretrained=True)' in out
    spec = load_sweep_spec(SMOKE)
    test = build_datasets(spec.data, spec.seed).test
    images = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    labels = np.array([test[i][1] for i in range(len(test))])
    seen = score_in_fresh_process(shipped, images, tmp_path / "fresh")
    assert seen["remem_ray imported"] is False
    accuracy = float((seen["logits"].argmax(1) == labels).mean())
    assert accuracy == pytest.approx(summary["best"]["student_test_acc"], abs=1e-9), (accuracy, summary["best"])
    assert np.abs(seen["onnx_logits"] - seen["logits"]).max() <= 1e-4
    card = (shipped / "README.md").read_text()
    assert summary["best"]["trial_id"] in card and f"{summary['best']['student_test_acc']:.4f}" in card

    # a trial that does not exist, a target that is not empty: one line, exit 2, nothing written
    for extra, expected in ((["--trial", "nope"], "--trial: no trial 'nope'"), ([], "exists and is not empty")):
        target = tmp_path / "other" if extra else shipped
        before = sorted(p.name for p in target.iterdir()) if target.exists() else None
        args = ["sweep", "export", "smoke", "--storage", str(root), "--to", str(target), *extra]
        rc, out = run_remem(args, tmp_path, env)
        assert rc == 2 and expected in out, out[-2000:]
        assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before


def _one_trial_spec(tmp_path: Path, name: str, teacher_epoch: int, gpus: object = None) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = name
    for role in ("teacher", "student") if gpus is not None else ():
        spec["sweep"]["resources"][role]["gpus_per_worker"] = gpus
    spec["student"]["epochs"] = 2
    spec["storage"]["root"] = str(tmp_path / "results")
    spec["sweep"].update(
        {
            "num_samples": 1,
            "asha": {"enabled": False},
            # student_lr given: the smoke spec also searches one at which the student barely learns
            "points_to_evaluate": [{"rho": 0.05, "alpha": 0.9, "teacher_epoch": teacher_epoch, "student_lr": 0.002}],
        }
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_two_sweeps_at_once_on_one_root_train_a_shared_teacher_once(tmp_path):
    """Two `remem sweep run` drivers on one Ray cluster and one storage root, needing the same
    teacher: sweep a trains it (held at its epoch 1 until sweep b is seen waiting for it: the
    overlap happens by design), sweep b reuses it. Trainings over both = distinct keys = 1.

    The cluster has one logical GPU, which sweep b's runs ask for with `gpus_per_worker: auto`:
    its driver's probe takes the GPU (no CUDA behind it here), keeps a whole GPU per worker and
    says so, and b's student run holds that GPU (trained on the CPU, device auto)."""
    holds = tmp_path / "holds"
    holds.mkdir()
    (tmp_path / "head").mkdir()
    head = RayHead(
        tmp_path / "head",
        num_cpus=2,
        extra_args=["--num-gpus=1"],
        extra_env={"REMEM_TEST_HOLD_AT": "teacher:1", "REMEM_TEST_HOLD_DIR": str(holds)},
    )
    head.start()
    procs = []
    try:
        env = remem_env(tmp_path, {k: head.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        for name, teacher_epoch, gpus in (("sweep-a", 4, 0), ("sweep-b", 2, "auto")):
            spec = _one_trial_spec(tmp_path, name, teacher_epoch, gpus)
            procs.append(start_remem(["sweep", "run", str(spec), "--address", head.gcs_address], tmp_path, env))
            if name == "sweep-a":  # a holds the lease and trains, held after its epoch 1
                _wait_for(
                    lambda: (holds / "teacher-1.claimed").exists() or procs[0][0].poll() is not None,
                    300,
                    "sweep a to train its teacher",
                )
                assert procs[0][0].poll() is None, procs[0][0].log_path.read_text()[-3000:]
        b_log = procs[1][0].log_path
        _wait_for(
            lambda: "waiting for teacher" in b_log.read_text() or procs[1][0].poll() is not None,
            300,
            "sweep b to wait for the teacher",
        )
        (holds / "teacher-1.release").touch()
        for proc, _ in procs:
            proc.wait(400)
    finally:
        for _, tree in procs:
            tree.kill_all()
        head.stop()
    logs = [proc.log_path.read_text() for proc, _ in procs]
    assert [proc.returncode for proc, _ in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "training teacher" in logs[0] and "waiting for teacher" in logs[1] and "training teacher" not in logs[1]
    root = tmp_path / "results"
    summaries = [json.loads((root / "sweeps" / name / "summary.json").read_text()) for name in ("sweep-a", "sweep-b")]
    keys = {row["teacher_key"] for s in summaries for row in s["trials"]}
    assert len(keys) == 1 and [p.name for p in (root / "teachers").iterdir()] == list(keys)
    assert sum(s["teacher_trainings_performed"] for s in summaries) == len(keys)
    assert [s["trials"][0]["teacher_trained"] for s in summaries] == [True, False]
    assert all(s["best"]["student_val_acc"] > 0.3 for s in summaries)
    assert "GPU shares" not in logs[0]
    assert "GPU shares (auto): student 1 GPU per worker: not measured (no CUDA device where the probe ran)" in logs[1]
    sizing = json.loads((root / "sweeps" / "sweep-b" / "gpu_shares.json").read_text())
    assert sizing["roles"]["student"] == {
        "gpus_per_worker": 1.0,
        "device": "cpu",
        "peak_mb": None,
        "resident_mb": 0.0,
        "total_mb": None,
        "need_mb": None,
    }


@pytest.fixture
def seaweed(tmp_path):
    server = SeaweedFS(tmp_path / "seaweed")
    server.start()
    yield server
    server.stop()


_JOB_WAIT = """
import sys, time
from ray.job_submission import JobSubmissionClient
address, job, what, until = sys.argv[1:]
jobs = JobSubmissionClient(address)
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    status, logs = str(jobs.get_job_status(job).value), jobs.get_job_logs(job)
    if until in (logs if what == "logs" else status) or status in ("SUCCEEDED", "FAILED", "STOPPED"):
        break
    time.sleep(1.0)
print(status)
print(logs)
"""


def _job_once(head: RayHead, job_id: str, what: str, until: str) -> tuple[str, str]:
    """(status, logs) of a job on `head` once its logs hold `until` (what="logs") or its status is
    it (what="status"), or it ended, or 300 s passed: asked from a process of the head's
    environment (its token; this process's Ray read its auth settings once, without it)."""
    proc = subprocess.run(
        [sys.executable, "-c", _JOB_WAIT, head.address, job_id, what, until],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, _, logs = proc.stdout.partition("\n")
    return status, logs


def _submitted_job(argv: list[str], head: RayHead) -> str:
    """The job id `remem sweep submit` printed (a loaded head's job agent may not answer at first)."""
    for _ in range(3):
        rc, out = run_remem(argv, head.workdir, head.env, timeout=120)
        if "No available agent to submit job" not in out:
            break
    found = re.findall(r"^remem-[\w.-]+-\d{8}-\d{6}$", out, flags=re.MULTILINE)
    assert rc == 0 and found, out[-3000:]
    return found[-1]


def _bucket_keys(client, prefix: str) -> set[str]:
    return {
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="remem", Prefix=prefix)
        for o in page.get("Contents", [])
    }


def _files_holding(folders: list[Path], secrets: list[str], skip: Path) -> list[str]:
    """Every file under `folders` (outside `skip`) whose bytes contain one of `secrets`."""
    hits = []
    needles = [s.encode() for s in secrets]
    for folder in folders:
        for path in folder.rglob("*"):
            if skip in path.parents or not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.faults
def test_s3_sweep_survives_an_outage_and_writes_no_credentials(tmp_path, seaweed):
    """The S3 smoke sweep; the server is stopped for about 20 s mid-sweep, then restarted over
    its data. The sweep completes (storage retries with backoff) or stops with a resumable
    error and resume completes; nothing stored before the outage is lost. The credentials
    in the environment appear in nothing the sweep wrote, Ray's session logs included."""
    client = seaweed.client()
    client.create_bucket(Bucket="remem")
    holds = tmp_path / "holds"
    holds.mkdir()
    # the outage begins while a student is held after its epoch 2, and the sweep goes on during it
    hold = {"REMEM_TEST_HOLD_AT": "student:2", "REMEM_TEST_HOLD_DIR": str(holds)}
    env = remem_env(tmp_path, {**seaweed.env(), **hold, "REMEM_KEEP_RAY_LOGS": "1"})  # scanned for credentials below
    ray_dirs_before = set(Path("/tmp").glob("remem-ray-*"))
    args = ["--storage", "s3://remem/exp", "--endpoint", seaweed.endpoint]
    proc, tree = start_remem(["sweep", "run", str(SMOKE), *args], tmp_path, env)
    try:
        _wait_for(
            lambda: (holds / "student-2.claimed").exists() or proc.poll() is not None, 300, "a student to reach epoch 2"
        )
        assert proc.poll() is None, proc.log_path.read_text()[-3000:]
        stored_before = _bucket_keys(client, "exp/")
        assert any(k.endswith("/epoch_2/manifest.json") for k in stored_before)
        assert any("/students/" in k for k in stored_before)
        seaweed.stop()
        (holds / "student-2.release").touch()
        time.sleep(20)  # the outage's length, not a wait for something to happen
        seaweed.start()
        proc.wait(400)
    finally:
        tree.kill_all()  # the driver (if still running) and everything it started
    out = proc.log_path.read_text()
    if proc.returncode != 0:  # a clear, resumable stop: resume must finish it
        assert "remem sweep resume" in out or "error" in out.lower(), out[-3000:]
        rc, out = run_remem(
            ["sweep", "resume", "s3://remem/exp/sweeps/smoke", "--endpoint", seaweed.endpoint], tmp_path, env
        )
        assert rc == 0, out[-3000:]
    keys = _bucket_keys(client, "exp/")
    # Train prunes its own old checkpoints, and each student its superseded bests (best.json names the one in use)
    lost = {k for k in stored_before if "/checkpoint_" not in k and "/best_epoch_" not in k} - keys
    assert not lost, sorted(lost)[:10]
    summary = json.loads(client.get_object(Bucket="remem", Key="exp/sweeps/smoke/summary.json")["Body"].read())
    _check_summary(summary, 4)
    assert "exp/sweeps/smoke/tuner.pkl" in keys and "exp/sweeps/smoke/sweep.log" in keys
    assert any(k.startswith("exp/sweeps/smoke/tensorboard/trial_") for k in keys)
    # the study's copy travels to the bucket too; Optuna opens it once fetched
    (tmp_path / "fetched").mkdir()
    (tmp_path / "fetched" / "optuna.db").write_bytes(
        client.get_object(Bucket="remem", Key="exp/sweeps/smoke/optuna.db")["Body"].read()
    )
    assert len(stored_study(tmp_path / "fetched", "smoke").trials) == 4
    for key in {r["teacher_key"] for r in summary["trials"]}:
        for epoch in (2, 4):  # in the folder of the generation that trained it
            assert any(
                k.startswith(f"exp/teachers/{key}/gen-") and k.endswith(f"/epoch_{epoch}/manifest.json") for k in keys
            )
    for row in summary["trials"]:
        pointer = f"exp/sweeps/smoke/students/{row['trial_id']}/best.json"
        best = json.loads(client.get_object(Bucket="remem", Key=pointer)["Body"].read())["checkpoint"]
        assert f"exp/sweeps/smoke/students/{row['trial_id']}/{best}/model.pt" in keys
        run = f"exp/sweeps/smoke/train-runs/student-{row['trial_id']}"
        assert any(k.startswith(f"{run}/checkpoint_") and k.endswith("/state.pt") for k in keys)
        # Train keeps the newest two (its bookkeeping; deleted folders can linger in a listing on SeaweedFS)
        snapshot = json.loads(
            client.get_object(Bucket="remem", Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
        )
        assert 1 <= len(snapshot["checkpoint_results"]) <= 2
    assert not (tmp_path / "remem-results").exists()  # nothing fell back to local storage
    rc, out = run_remem(
        ["sweep", "status", "s3://remem/exp/sweeps/smoke", "--endpoint", seaweed.endpoint], tmp_path, env, timeout=120
    )
    assert rc == 0 and summary["best"]["trial_id"] in out
    # the best student, exported from the bucket into the bucket (remem_ray.export; the card last)
    args = ["sweep", "export", "s3://remem/exp/sweeps/smoke", "--endpoint", seaweed.endpoint, "--to", "s3://remem/ship"]
    rc, out = run_remem(args, tmp_path, env, timeout=300)
    assert rc == 0, out[-3000:]
    assert _bucket_keys(client, "ship/") == {f"ship/{n}" for n in ("config.json", "model.safetensors", "README.md")}

    # credentials: nothing written holds them - logs, local files, Ray's session folders, the bucket
    secrets = [seaweed.ACCESS_KEY, seaweed.SECRET_KEY]
    ray_dirs = sorted(set(Path("/tmp").glob("remem-ray-*")) - ray_dirs_before)
    assert ray_dirs  # the sweep's own Ray session folders were found and are scanned
    assert _files_holding([tmp_path, *ray_dirs], secrets, skip=seaweed.data_dir) == []
    for key in keys:
        body = client.get_object(Bucket="remem", Key=key)["Body"].read()
        assert not any(s.encode() in body for s in secrets), key
    for folder in ray_dirs:  # kept for the scan only (REMEM_KEEP_RAY_LOGS)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_sweep_ray_job_submit_started_is_stopped_mid_way_resumed_as_a_job_and_read_by_rays_own_client(tmp_path):
    """`ray job submit --working-dir DIR --runtime-env-json ... -- remem sweep run spec.yaml` (the
    README's recipe, with the stop signal `remem sweep submit` sets itself) to a local `ray start
    --head` (127.0.0.1, its own PID namespace, ended by PID); `remem sweep stop` once a trial runs:
    the driver ends as Ctrl-C would (its own "interrupted" line, its driver lease released; Ray's
    default SIGTERM-then-SIGKILL ended it with neither); `remem sweep resume FOLDER --address
    http://HEAD:8265` finishes it as a job (before: refused, "`remem sweep submit` takes it");
    Ray Tune's own ExperimentAnalysis reads the sweep folder and finds remem's best trial.

    First, on the same cluster: `remem sweep run --address` with an s3:// root whose keys only
    the driver holds (the cluster has none; drivers never send theirs) stops at once with one
    line and exit 2, writing nothing (before the fix: every trial attempt failed, ACCESS_DENIED)."""
    from remem_ray.sweep.jobs import STOP_ENV

    (tmp_path / "head").mkdir()
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = "submitted"
    spec["teacher"].update({"epochs": 2, "checkpoint_epochs": [2]})
    spec["student"]["epochs"] = 2
    spec["storage"]["root"] = str(tmp_path / "results")
    spec["sweep"].update(
        {"num_samples": 2, "asha": {"enabled": False}, "search": {**spec["sweep"]["search"], "teacher_epoch": [2]}}
    )
    spec["sweep"]["points_to_evaluate"] = [{**p, "teacher_epoch": 2} for p in spec["sweep"]["points_to_evaluate"][:2]]
    (job_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    head = RayHead(tmp_path / "head", num_cpus=2, extra_env={"REMEM_CACHE_DIR": str(tmp_path / "cache")})
    # a cluster with no AWS credentials of any kind (no keys, no profile files, no instance role)
    head.env = {k: v for k, v in head.env.items() if not k.startswith("AWS_")} | {
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    seaweed = SeaweedFS(tmp_path / "seaweed")
    seaweed.start()
    head.start()
    try:
        seaweed.client().create_bucket(Bucket="remem")
        direct = ["sweep", "run", str(job_dir / "spec.yaml"), "--address", head.gcs_address]
        direct += ["--storage", "s3://remem/direct", "--endpoint", seaweed.endpoint]
        rc, out = run_remem(direct, tmp_path, {**head.env, **seaweed.env()}, timeout=240)
        errors = [line for line in out.splitlines() if line.startswith("remem: error")]
        assert rc == 2 and len(errors) == 1, out[-3000:]
        assert "no AWS credentials for storage.root s3://remem/direct" in errors[0]
        assert f"checked from a node of the Ray cluster at {head.gcs_address}" in errors[0]
        assert _bucket_keys(seaweed.client(), "") == set() and not (tmp_path / "remem-results").exists()
        experiment = tmp_path / "results" / "sweeps" / "submitted"
        job_id = "remem-by-rays-cli"
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.address, "--no-wait"]
        submit += ["--submission-id", job_id, "--runtime-env-json", json.dumps({"env_vars": STOP_ENV})]
        for _ in range(3):  # a loaded head's job agent may not answer in time: Ray says to try again
            proc = subprocess.run(
                [*submit, "--working-dir", str(job_dir), "--", "remem", "sweep", "run", "spec.yaml"],
                env=head.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        status, _ = _job_once(head, job_id, "logs", " started: rho ")  # a trial runs
        assert status == "RUNNING", status
        rc, out = run_remem(["sweep", "stop", job_id, "--address", head.address], tmp_path, head.env, timeout=120)
        assert rc == 0 and "stopping as Ctrl-C would" in out, out
        status, stopped = _job_once(head, job_id, "status", "STOPPED")
        assert status == "STOPPED" and "remem: interrupted:" in stopped, stopped[-3000:]
        assert "continues the sweep" in stopped
        lease = current_record(Storage(str(experiment)).child("driver-lease"))
        assert lease is not None and lease.released
        resumed = _submitted_job(["sweep", "resume", str(experiment), "--address", head.address], head)
        status, logs = _job_once(head, resumed, "status", "SUCCEEDED")
    finally:
        head.stop()
        seaweed.stop()
    assert status == "SUCCEEDED" and "trials 2/2 done" in logs, logs[-3000:]
    summary = json.loads((experiment / "summary.json").read_text())

    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment))
    assert sorted(t.trial_id for t in analysis.trials) == sorted(r["trial_id"] for r in summary["trials"])
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    best = analysis.get_best_trial(METRIC, "max", scope="all")
    assert best is not None and best.trial_id == summary["best"]["trial_id"]
    assert analysis.dataframe(metric=METRIC, mode="max")[METRIC].max() == pytest.approx(
        summary["best"]["student_val_acc"]
    )
