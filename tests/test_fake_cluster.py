"""A fake autoscaling cluster (cluster/local-fake.yaml) on 127.0.0.1, in its own PID namespace.

Sweeps go in through `remem sweep submit` (the Ray Jobs API), ask for one logical GPU per
Train worker, and so make the autoscaler launch GPU nodes; ending the namespace's first
process ends every process of the cluster, and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _ray_exe() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


class FakeCluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
        cfg = yaml.safe_load((ROOT / "cluster" / "local-fake.yaml").read_text())
        cfg["provider"]["gcs_address"] = f"127.0.0.1:{self.gcs_port}"
        self.config = workdir / "fake-cluster.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    # the cluster's `python` (jobs run `python -m remem_ray.cli`) is this venv's
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        # Token auth needs a token: the test makes its own rather than count on ~/.ray/auth_token
        # existing (a fresh machine has none until some `ray.init()` writes one)
        token = workdir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env["RAY_AUTH_TOKEN_PATH"] = str(token)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", _ray_exe(), "start", "--head",
               "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", "--num-cpus=1", "--num-gpus=0",
               '--resources={"remem_driver": 8}', "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--autoscaling-config={self.config}",
               f"--temp-dir={self.temp_dir}", "--block", "--disable-usage-stats"]
        log = open(self.workdir / "cluster.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "cluster.log").read_text()[-3000:])
            if self.nodes() is not None:
                return
            time.sleep(1)
        raise RuntimeError("fake cluster did not come up: " + (self.workdir / "cluster.log").read_text()[-3000:])

    def nodes(self) -> list[dict] | None:
        """All nodes the cluster has known (alive and dead), via the State API; None if unreachable."""
        code = ("import json, ray.util.state as s; "
                f"print(json.dumps([n.__dict__ for n in s.list_nodes(address='{self.address}', "
                "detail=True, limit=100)], default=str))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    def gpu_nodes(self) -> list[dict]:
        return [n for n in self.nodes() or [] if (n.get("resources_total") or {}).get("GPU")]

    def remem(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "remem_ray.cli", *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def cluster_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self) -> None:
        """SIGKILL the namespace's init: the kernel then ends every process in the namespace."""
        if self.proc is None:
            return
        try:
            for child in psutil.Process(self.proc.pid).children():
                child.kill()
        except psutil.Error:
            pass
        self.proc.kill()
        self.proc.wait(30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
    spec["sweep"].update(num_samples=num_samples, max_concurrent_trials=2, asha={"enabled": False},
                         resources={"teacher": gpu_worker, "student": gpu_worker, "trial_cpus": 0.1,
                                    "driver_resource": "remem_driver", "backend": "gloo"})
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait_job(cluster: FakeCluster, job_id: str, timeout: float) -> str:
    out = cluster.remem("sweep", "logs", job_id, "--address", cluster.address, "--follow", timeout=timeout)
    assert f"job {job_id}: " in out.stderr, out.stderr
    return out.stderr.strip().splitlines()[-1].split(": ")[-1]


def test_submitted_sweep_scales_gpu_nodes_up_and_down(fake_cluster, tmp_path):
    storage = tmp_path / "results"
    spec = _gpu_spec(tmp_path / "gpu.yaml", "fake-gpu", student_epochs=2, num_samples=2, storage=storage)
    assert fake_cluster.gpu_nodes() == []  # min_workers 0: nothing before demand
    # --ship-package uploads the package (its folder, from remem_ray.__file__) with the job
    submitted = fake_cluster.remem("sweep", "submit", str(spec), "--address", fake_cluster.address,
                                   "--ship-package")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    status = _wait_job(fake_cluster, job_id, timeout=420)
    assert status == "SUCCEEDED", fake_cluster.remem("sweep", "logs", job_id, "--address",
                                                     fake_cluster.address).stdout[-4000:]
    summary = json.loads((storage / "sweeps" / "fake-gpu" / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and all(r["state"] == "TERMINATED" for r in summary["trials"])
    launched = fake_cluster.gpu_nodes()
    assert len(launched) >= 1  # the autoscaler launched GPU nodes for the Train workers
    deadline = time.time() + 180
    while time.time() < deadline and any(n["state"] == "ALIVE" for n in fake_cluster.gpu_nodes()):
        time.sleep(5)
    assert not any(n["state"] == "ALIVE" for n in fake_cluster.gpu_nodes()), fake_cluster.gpu_nodes()


def _student_worker_node_pids(cluster: FakeCluster) -> list[int] | None:
    """PIDs of the raylet (and its workers) hosting a student Train worker, if one is running."""
    for pid in cluster.cluster_pids():
        try:
            proc = psutil.Process(pid)
            if proc.name().startswith("ray::RayTrainWo") or "RayTrainWorker" in " ".join(proc.cmdline()):
                node = proc.parent()
                while node is not None and "raylet" not in node.name():
                    node = node.parent()
                if node is not None:
                    return [node.pid] + [c.pid for c in node.children(recursive=True)]
        except psutil.Error:
            continue
    return None


def test_trial_survives_losing_its_gpu_node(fake_cluster, tmp_path):
    storage = tmp_path / "results"
    spec = _gpu_spec(tmp_path / "loss.yaml", "node-loss", student_epochs=6, num_samples=1, storage=storage)
    submitted = fake_cluster.remem("sweep", "submit", str(spec), "--address", fake_cluster.address)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    runs = storage / "sweeps" / "node-loss" / "train-runs"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and killed_at is None:
        snapshots = list(runs.glob("student-*/checkpoint_manager_snapshot.json"))
        if snapshots:
            try:
                latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
            except json.JSONDecodeError:
                latest = {}
            epoch = int(latest.get("metrics", {}).get("epoch", 0))
            pids = _student_worker_node_pids(fake_cluster) if 1 <= epoch <= 3 else None
            if pids:
                for pid in pids:
                    try:
                        psutil.Process(pid).kill()  # the node vanishes, as a spot node does
                    except psutil.Error:
                        pass
                killed_at = epoch
        time.sleep(0.5)
    assert killed_at is not None, "never saw a student mid-training"
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
