"""Real servers for integration tests, on 127.0.0.1 with free ports, ended by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} not installed: pip install -e '.[test]'")
    return exe


class SeaweedFS:
    """A SeaweedFS server (master, volume, filer, S3 gateway) with auth, telemetry off."""

    ACCESS_KEY = "remem-test-access"
    SECRET_KEY = "remem-test-secret-0123456789"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {
            k: free_port()
            for k in (
                "master",
                "master.grpc",
                "volume",
                "volume.grpc",
                "filer",
                "filer.grpc",
                "s3",
                "s3.grpc",
                "iam",
                "metrics",
            )
        }
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> None:
        config = self.data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        p = self.ports
        args = [
            _venv_tool("weed"),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-iam.port={p['iam']}",
            f"-metricsPort={p['metrics']}",
        ]
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                c = self.client()
                if "ready-check" not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
                    c.create_bucket(Bucket="ready-check")
                c.put_object(Bucket="ready-check", Key="k", Body=b"ok")
                if c.get_object(Bucket="ready-check", Key="k")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout} s: {last}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        """TERM, then KILL: weed ignores SIGTERM for about 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class ProcessTree:
    """Records every descendant of a process while it runs, so all can be ended by PID later
    (Ray's agents can outlive a SIGKILLed driver as orphans)."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        try:
            for child in psutil.Process(self.root_pid).children(recursive=True):
                self.pids.add(child.pid)
        except psutil.Error:
            pass
        for pid in list(self.pids):  # grandchildren re-parented away from the root
            try:
                self.pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass

    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            self._scan()

    def kill_all(self) -> None:
        self._scan()
        self._stop.set()
        self._thread.join(timeout=2)
        for pid in sorted(self.pids | {self.root_pid}):
            try:
                proc = psutil.Process(pid)
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs([p for p in (self._proc(pid) for pid in self.pids) if p], timeout=10)

    @staticmethod
    def _proc(pid: int):
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None


class RayHead:
    """A Ray head (`ray start --head --block`) on 127.0.0.1 in its own PID namespace: killing the
    namespace's first process ends every process of the cluster, and nothing else."""

    def __init__(
        self, workdir: Path, num_cpus: int, extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        self.workdir, self.num_cpus, self.extra_args = workdir, num_cpus, extra_args or []
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # the cluster's `python` (jobs run `python -m remem_ray.cli`) is this venv's
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        # Token auth needs a token: made here rather than counting on ~/.ray/auth_token existing
        # (a fresh machine has none until some `ray.init()` writes one)
        token = workdir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env["RAY_AUTH_TOKEN_PATH"] = str(token)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if shutil.which("unshare") is None:
            raise RuntimeError("unshare (util-linux) is needed to run a Ray head in its own PID namespace")
        cmd = [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            _venv_tool("ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            "--block",
            "--disable-usage-stats",
            *self.extra_args,
        ]
        log = open(self.workdir / "cluster.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "cluster.log").read_text()[-3000:])
            if self.nodes() is not None:
                return
            time.sleep(1)
        raise RuntimeError("Ray head did not come up: " + (self.workdir / "cluster.log").read_text()[-3000:])

    def nodes(self) -> list[dict] | None:
        """All nodes the cluster has known (alive and dead), via the State API; None if unreachable."""
        return self.state("list_nodes", limit=100)

    def state(self, listing: str, **kwargs) -> list[dict] | None:
        """A State API listing (`list_nodes`, `list_actors`...) as dicts, asked from a fresh
        process (this one keeps no Ray client); None if the cluster does not answer."""
        code = (
            "import json, ray.util.state as s; "
            f"print(json.dumps([n.__dict__ for n in s.{listing}(address='{self.address}', "
            f"detail=True, **{kwargs!r})], default=str))"
        )
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

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


class BystanderRay:
    """Another Ray on the same host, as a user's `ray.init()` in another process leaves one: its own
    temp dir, on 127.0.0.1, unrelated to whatever the test runs beside it. Ended by PID."""

    def __init__(self, workdir: Path) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
        self.log = workdir / "bystander-ray.log"
        code = (
            "import ray, sys; "
            f"ray.init(_temp_dir={self.temp_dir!r}, _node_ip_address='127.0.0.1', num_cpus=1, "
            "include_dashboard=False); "
            "print('up', flush=True); sys.stdin.read()"
        )
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.tree = ProcessTree(self.proc.pid)

    def __enter__(self) -> BystanderRay:
        deadline = time.time() + 120
        while "up" not in self.log.read_text().split():
            if self.proc.poll() is not None or time.time() > deadline:
                self.__exit__()
                raise RuntimeError("the bystander Ray did not start: " + self.log.read_text()[-2000:])
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.tree.kill_all()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
