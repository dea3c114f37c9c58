"""Shared fixtures: tiny models, a private cwd, and a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.servers import free_port

# A ViT small enough for CPU tests; avg pooling learns faster than a class token on tiny data.
TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "class_token": False,
    "global_pool": "avg",
}


def pytest_addoption(parser):
    parser.addoption(
        "--busy-cores",
        type=int,
        default=0,
        help="load this many cores with busy loops for the whole run (fault tests must pass "
        "on a machine slowed by other work)",
    )


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) the tests that start Ray
# clusters and S3 servers (marker integration, about four fifths of the suite's time) run one at a
# time on one worker, first: their sweeps leave part of the CPU idle while drivers and Train runs
# start, and the other worker's unit tests fill it. Never two Ray clusters at once: on 2 cores they
# would only slow each other. Tests sharing a module-scoped fixture (a trained teacher) stay on one
# worker, so it is built once.
RAY_CLUSTERS = "ray-clusters"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.xdist_group(RAY_CLUSTERS))
        elif any(d.scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)  # stable: the rest keeps its order


def pytest_collection_finish(session):
    """Refuse to run the Ray-cluster tests on two workers at once: pytest-xdist applies its groups
    (under --dist loadgroup only) by rewriting node ids, which pytest 9 ignores (hence pytest < 9 in
    the test extras; the controller says so in pytest_configure)."""
    if not hasattr(session.config, "workerinput"):
        return
    ungrouped = [
        i.nodeid
        for i in session.items
        if i.get_closest_marker("integration") and not i.nodeid.endswith(f"@{RAY_CLUSTERS}")
    ]
    if ungrouped:
        raise pytest.UsageError(f"{ungrouped[0]} would share the CPU with another Ray test: use --dist loadgroup")


def pytest_terminal_summary(terminalreporter):
    """What the learning tests measured (their `learning` properties), from any worker, at the end."""
    lines = [
        value
        for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
        if report.when == "call"
        for name, value in report.user_properties
        if name == "learning"
    ]
    if lines:
        terminalreporter.write_sep("-", "what the learning tests measured")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError("pytest-xdist cannot group these tests under pytest 9: pip install 'pytest<9'")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: one torch thread each (two workers, two
        import torch  # cores; two threads each made OpenMP spin, and the learning tests took 10x longer)

        torch.set_num_threads(1)


_BUSY: list[subprocess.Popen] = []


def pytest_sessionstart(session):
    """With --busy-cores N: N processes spinning at full speed while the tests run, started by the
    run's main process (under pytest-xdist, the controller: a worker may end or be shut down early)."""
    if not hasattr(session.config, "workerinput"):
        for _ in range(session.config.getoption("--busy-cores")):
            _BUSY.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))


def pytest_sessionfinish(session):
    while _BUSY:  # ended by PID
        proc = _BUSY.pop()
        proc.kill()
        proc.wait(10)


@pytest.fixture
def connect_timeouts(monkeypatch):
    """The timeout of every socket.create_connection made while the test runs (calls go through):
    a fail-fast path is shown by its bounded connects, not by a stopwatch that a slow machine fails."""
    import socket as socket_module

    seen: list[float | None] = []
    real = socket_module.create_connection

    def spy(address, timeout=None, *args, **kwargs):
        seen.append(timeout)
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket_module, "create_connection", spy)
    return seen


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so that anything written by default lands where we can see it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _moto_server(tmp_path_factory, name: str, env: dict[str, str] | None = None):
    """Run moto's S3 server on a free loopback port; yields its endpoint, ends it by PID."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not installed: pip install -e '.[test]'")
    port = free_port()
    log = open(tmp_path_factory.mktemp(name) / "moto.log", "wb")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"moto_server ({name}) did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (in memory, any credentials): fast S3 for unit tests."""
    yield from _moto_server(tmp_path_factory, "moto")


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A fresh bucket on the moto server, with credentials in the environment only."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"b{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return {"endpoint": moto_endpoint, "bucket": bucket, "client": client}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """One storage-backed suite for every backend: a local folder and a bucket prefix on S3."""
    from remem_ray.storage import Storage

    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3")
    return Storage(f"s3://{s3['bucket']}/prefix", endpoint=s3["endpoint"])


@pytest.fixture(scope="session")
def moto_auth_endpoint(tmp_path_factory):
    """A moto S3 server that checks credentials: unknown keys get 403 (the wrong-credentials case)."""
    # moto's switch: authenticate every request
    yield from _moto_server(tmp_path_factory, "moto-auth", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


@pytest.fixture
def dead_endpoint():
    """An http endpoint on loopback that nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An empty AWS credential chain: no AWS_* variables, no profile files, no instance metadata."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
