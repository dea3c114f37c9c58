"""A fake autoscaling cluster (cluster/local-fake.yaml) on 127.0.0.1, in its own PID namespace.

Sweeps go in through `remem sweep submit` (the Ray Jobs API), ask for one logical GPU per
Train worker, and so make the autoscaler launch GPU nodes; ending the namespace's first
process ends every process of the cluster, and nothing else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers.servers import RayHead

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


class FakeCluster(RayHead):
    """The head with cluster/local-fake.yaml's autoscaler: GPU nodes come and go on demand."""

    def __init__(self, workdir: Path) -> None:
        config = workdir / "fake-cluster.yaml"
        self.holds = workdir / "holds"
        self.holds.mkdir()
        super().__init__(
            workdir,
            num_cpus=0,  # as cluster/'s heads: trial drivers find their place by the driver resource alone
            extra_args=['--resources={"remem_driver": 8}', f"--autoscaling-config={config}"],
            extra_env={
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # the node-loss sweep's student holds after its epoch 2 (only that sweep's)
                "REMEM_TEST_HOLD_AT": "student:2@/node-loss/",
                "REMEM_TEST_HOLD_DIR": str(self.holds),
            },
        )
        cfg = yaml.safe_load((ROOT / "cluster" / "local-fake.yaml").read_text())
        cfg["provider"]["gcs_address"] = self.gcs_address
        # idle nodes go after 12 s instead of the 30 s users get: the scale-down is waited for below,
        # and a trial's next Train run asks for its node within a few seconds of the last one's end
        cfg["idle_timeout_minutes"] = 0.2
        config.write_text(yaml.safe_dump(cfg))
        self.config = config

    def gpu_nodes(self) -> list[dict]:
        return [n for n in self.nodes() or [] if (n.get("resources_total") or {}).get("GPU")]

    def remem(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "remem_ray.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to run the fake cluster in its own PID namespace")
    cluster = FakeCluster(tmp_path_factory.mktemp("fake-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


def _gpu_spec(path: Path, name: str, student_epochs: int, num_samples: int, storage: Path) -> Path:
    spec = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    spec["name"] = name
    spec["student"]["epochs"] = student_epochs
    spec["storage"]["root"] = str(storage)
    gpu_worker = {"num_workers": 1, "cpus_per_worker": 0.5, "gpus_per_worker": 1}
    spec["sweep"].update(
        num_samples=num_samples,
        max_concurrent_trials=2,
        asha={"enabled": False},
        resources={
            "teacher": gpu_worker,
            "student": gpu_worker,
            "trial_cpus": 0.1,
            "driver_resource": "remem_driver",
            "backend": "gloo",
        },
    )
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_job(cluster: FakeCluster, job_id: str, timeout: float) -> str:
    out = cluster.remem("sweep", "logs", job_id, "--address", cluster.address, "--follow", timeout=timeout)
    assert f"job {job_id}: " in out.stderr, out.stderr
    status = out.stderr.strip().splitlines()[-1].split(": ")[-1]
    if status == "SUCCEEDED":  # the dashboard's stream ends after the job's last line
        assert "\nreport: " in out.stdout, out.stdout[-2000:]
    return status


def test_submitted_sweep_scales_gpu_nodes_up_and_down(fake_cluster, tmp_path):
    storage = tmp_path / "results"
    spec = _gpu_spec(tmp_path / "gpu.yaml", "fake-gpu", student_epochs=2, num_samples=2, storage=storage)
    assert fake_cluster.gpu_nodes() == []  # min_workers 0: nothing before demand
    # --ship-package uploads the package (its folder, from remem_ray.__file__) with the job
    submitted = fake_cluster.remem("sweep", "submit", str(spec), "--address", fake_cluster.address, "--ship-package")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    status = _wait_job(fake_cluster, job_id, timeout=420)
    assert status == "SUCCEEDED", fake_cluster.remem("sweep", "logs", job_id, "--address", fake_cluster.address).stdout[
        -4000:
    ]
    summary = json.loads((storage / "sweeps" / "fake-gpu" / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and all(r["state"] == "TERMINATED" for r in summary["trials"])
    launched = fake_cluster.gpu_nodes()
    assert len(launched) >= 1  # the autoscaler launched GPU nodes for the Train workers
    deadline = time.time() + 180
    while time.time() < deadline and any(n["state"] == "ALIVE" for n in fake_cluster.gpu_nodes()):
        time.sleep(1)
    assert not any(n["state"] == "ALIVE" for n in fake_cluster.gpu_nodes()), fake_cluster.gpu_nodes()


def _host_pid(cluster: FakeCluster, ns_pid: int) -> int:
    """The PID, as this test sees it, of a cluster process that knows itself (in the cluster's PID
    namespace) as `ns_pid`: /proc's NSpid line lists a process's PID in each namespace, outermost first."""
    for pid in cluster.cluster_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        ns_pids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if ns_pids and int(ns_pids[-1]) == ns_pid:
            return pid
    raise AssertionError(f"no cluster process is PID {ns_pid} in the cluster's namespace")


def _node_pids_of(pid: int) -> list[int]:
    """The raylet hosting process `pid`, and every process under it: one fake node."""
    node = psutil.Process(pid)
    while node is not None and "raylet" not in node.name():
        node = node.parent()
    assert node is not None, f"process {pid} runs on no raylet"
    return [node.pid] + [c.pid for c in node.children(recursive=True)]


@pytest.mark.faults
def test_trial_survives_losing_its_gpu_node(fake_cluster, tmp_path):
    storage = tmp_path / "results"
    spec = _gpu_spec(tmp_path / "loss.yaml", "node-loss", student_epochs=6, num_samples=1, storage=storage)
    submitted = fake_cluster.remem("sweep", "submit", str(spec), "--address", fake_cluster.address)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    runs = storage / "sweeps" / "node-loss" / "train-runs"
    claimed = fake_cluster.holds / "student-2.claimed"

    def registered_epoch() -> int:
        snapshots = list(runs.glob("student-*/checkpoint_manager_snapshot.json"))
        try:
            latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
        except (IndexError, OSError, json.JSONDecodeError):
            return 0
        return int(latest.get("metrics", {}).get("epoch", 0))

    # the student is held after reporting epoch 2 (so it cannot move on) until Train has registered
    # that checkpoint; then its node vanishes, as a spot node does
    deadline = time.time() + 300
    while not (claimed.exists() and claimed.read_text() and registered_epoch() >= 2):
        assert time.time() < deadline, "the student never reached its epoch 2"
        time.sleep(0.5)
    killed_at = registered_epoch()
    held = _host_pid(fake_cluster, json.loads(claimed.read_text())["pid"])
    for pid in _node_pids_of(held):
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    status = _wait_job(fake_cluster, job_id, timeout=420)
    logs = fake_cluster.remem("sweep", "logs", job_id, "--address", fake_cluster.address).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads((storage / "sweeps" / "node-loss" / "summary.json").read_text())
    (row,) = summary["trials"]
    assert row["state"] == "TERMINATED" and row["epochs_done"] == 6
    trial_dir = storage / "sweeps" / "node-loss" / f"trial_{row['trial_id']}"
    results = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]
    resumed = [r for r in results if r["start_epoch"] > 1]
    assert resumed and resumed[0]["start_epoch"] >= killed_at + 1, results  # from the checkpoint, not epoch 1
    assert len(fake_cluster.gpu_nodes()) >= 2  # a replacement node was launched
