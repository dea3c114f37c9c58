"""One suite for every storage backend (local folder and S3), like Optuna's storage tests."""

import contextlib
import functools
import hashlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from remem_ray.errors import ResourceError
from remem_ray.storage import PREFLIGHT_TIMEOUT_S, Storage, bucket_error, preflight


def test_write_read_exists_list(store):
    assert not store.exists("a/b.txt")
    store.write_text("a/b.txt", "hello")
    store.write_bytes("a/c.bin", b"\x00\x01")
    assert store.exists("a/b.txt") and store.is_file("a/b.txt")
    assert store.read_text("a/b.txt") == "hello"
    assert store.list_dir("a") == ["b.txt", "c.bin"]
    assert store.list_dir("missing") == []


def test_overwrite_replaces_whole_object(store):
    store.write_text("x.json", "first version, longer")
    store.write_text("x.json", "second")
    assert store.read_text("x.json") == "second"


def test_exclusive_create_lets_exactly_one_of_many_racers_win(store):
    import threading

    racers, start, wins = 8, threading.Barrier(8), []

    def race(i):
        start.wait()
        if store.create_exclusive("lock.json", f"racer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.read_text("lock.json") == f"racer {wins[0]}"  # the winner's whole object, never replaced
    assert not store.create_exclusive("lock.json", b"late")
    assert store.list_dir() == ["lock.json"]  # no temp files left behind


def test_upload_download_and_delete_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "sub" / "two.txt").write_text("2")
    store.upload_dir(src, "folder")
    out = store.download_dir("folder", tmp_path / "out")
    assert (out / "one.txt").read_text() == "1" and (out / "sub" / "two.txt").read_text() == "2"
    child = store.child("folder")
    assert child.read_text("sub/two.txt") == "2"
    assert child.uri("sub").startswith(store.uri("folder"))
    store.delete_file("folder/one.txt")
    store.delete_file("folder/one.txt")  # already gone: no error
    assert not store.exists("folder/one.txt") and store.exists("folder/sub/two.txt")
    store.delete_dir("folder")
    assert not store.exists("folder/sub/two.txt")


def test_missing_object_error_names_the_uri(store):
    with pytest.raises(ResourceError, match=r"^storage: cannot read .*nothing-here"):
        store.read_bytes("nothing-here")


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    import remem_ray.storage.fs as storage_fs

    # fewer retries than in production (13, about a minute of backoff): the error is the point here
    monkeypatch.setattr(storage_fs, "S3_MAX_ATTEMPTS", 2)
    store = Storage("s3://bucket/p", endpoint="http://127.0.0.1:9")
    with pytest.raises(ResourceError, match=r"^storage: cannot"):
        store.exists("x")


# --------------------------------------------------------------------------- preflight


def test_preflight_accepts_a_new_local_root_without_creating_it(tmp_path):
    preflight(str(tmp_path / "new" / "root"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "root, expected",
    [
        ("occupied", r"^storage: storage.root .*occupied is a file, not a folder$"),
        ("occupied/below", r"^storage: cannot create storage.root .*occupied/below: .*occupied is a file"),
    ],
)
def test_preflight_refuses_a_local_root_that_cannot_be_a_folder(root, expected, tmp_path):
    (tmp_path / "occupied").write_text("x")
    with pytest.raises(ResourceError, match=expected):
        preflight(str(tmp_path / root))
    preflight(str(tmp_path / root), writable=False)  # readers leave local roots to the lookup itself


def test_preflight_accepts_a_good_bucket_and_writes_nothing(s3):
    preflight(f"s3://{s3['bucket']}/prefix", s3["endpoint"])
    assert s3["client"].list_objects_v2(Bucket=s3["bucket"]).get("KeyCount", 0) == 0


def test_preflight_names_a_missing_bucket(s3):
    with pytest.raises(ResourceError, match=r"bucket 'nope-\w+' of storage.root s3://nope-\w+/p does not exist"):
        preflight(f"s3://nope-{s3['bucket']}/p", s3["endpoint"])


def test_preflight_fails_fast_on_a_dead_endpoint(dead_endpoint, connect_timeouts):
    with pytest.raises(ResourceError, match=rf"cannot reach the S3 endpoint {dead_endpoint} \(storage.endpoint\)"):
        preflight("s3://bucket/p", dead_endpoint)
    assert connect_timeouts == [PREFLIGHT_TIMEOUT_S]  # one bounded connect, not pyarrow's retries


def test_preflight_names_the_field_it_was_given(dead_endpoint):
    with pytest.raises(ResourceError, match=r"\(--endpoint\)"):
        preflight("s3://bucket/p", dead_endpoint, root_field="--storage", endpoint_field="--endpoint")


def test_preflight_without_credentials_says_what_to_set(moto_endpoint, no_aws_credentials):
    with pytest.raises(ResourceError, match=r"no AWS credentials for storage.root s3://b/p: set AWS_ACCESS_KEY_ID"):
        preflight("s3://b/p", moto_endpoint)


def test_credential_lookup_returns_fast_with_instance_metadata_enabled(moto_endpoint, no_aws_credentials, monkeypatch):
    """Off EC2 boto3's metadata probe gives up after one try of 1 s; it must never hang the CLI."""
    import botocore.session

    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    config = botocore.session.get_session()
    # the probe's bound, as boto3 resolves it here (its defaults; the test environment sets neither)
    assert config.get_config_variable("metadata_service_timeout") == 1
    assert config.get_config_variable("metadata_service_num_attempts") == 1
    with pytest.raises(ResourceError):  # no credentials here; on EC2 with a role: the bucket is missing
        preflight(f"s3://missing-{uuid.uuid4().hex[:8]}/p", moto_endpoint)


def test_preflight_reports_access_denied_for_wrong_credentials(moto_auth_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    denied = r"access denied to bucket 'b' of storage.root s3://b/p .*\((403|InvalidAccessKeyId)\)"
    with pytest.raises(ResourceError, match=denied):
        preflight("s3://b/p", moto_auth_endpoint)


@pytest.mark.parametrize(
    "code, expected",
    [
        ("404", "does not exist"),
        ("NoSuchBucket", "does not exist"),
        ("403", "access denied"),
        ("AccessDenied", "access denied"),
        ("500", "cannot use bucket 'b'"),
    ],
)
def test_bucket_error_maps_s3_answers_to_one_line(code, expected):
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": code, "Message": "line one\nline two"}}, "HeadBucket")
    message = str(bucket_error(exc, "b", "s3://b/p", "storage.root"))
    assert expected in message and "storage.root" in message and "\n" not in message


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "http://", "http://host:notaport", "ftp://host:21"])
def test_preflight_refuses_an_endpoint_that_is_not_a_url(endpoint):
    with pytest.raises(ResourceError, match=r"--endpoint must look like http://host:port"):
        preflight("s3://b/p", endpoint, endpoint_field="--endpoint")


def test_preflight_names_an_endpoint_boto3_refuses_in_one_line(monkeypatch):
    """A compose service name (`minio_1`) resolves on the user's network and passes the URL and
    TCP checks, but boto3 refuses the host name. Before, that ValueError came out as a traceback."""
    import importlib

    preflight_module = importlib.import_module("remem_ray.storage.preflight")  # the package exports the function
    monkeypatch.setattr(preflight_module, "_check_endpoint", lambda endpoint, field: None)  # reachable there
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        ResourceError, match=r"^storage: cannot address bucket 'b' at http://minio_1:9000 for storage.root"
    ):
        preflight("s3://b/p", "http://minio_1:9000")


def test_a_node_fetches_an_s3_object_once_while_its_other_processes_wait_and_reuse_it(
    s3, tmp_path, monkeypatch, capsys
):
    """Every DDP rank and trial on a node asks for the same weights or dataset at once. Each fetched
    its own copy, and one finishing second removed the copy another had put in place and was
    reading. Failed before: the second caller downloaded too, while the first was still fetching.
    The waiter says whom it waits for (it waited in silence)."""
    import threading

    from remem_ray.storage import fetch_to_cache

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("remem_ray.storage.cache.WAIT_NOTICE_AFTER_S", 0.0)  # this wait is short by design
    s3["client"].put_object(Bucket=s3["bucket"], Key="w/weights.pt", Body=b"weights")
    uri = f"s3://{s3['bucket']}/w/weights.pt"
    downloads, first_in, go_on = [], threading.Event(), threading.Event()
    read_bytes = Storage.read_bytes

    def slow_read(self, rel):
        downloads.append(rel)
        first_in.set()
        assert go_on.wait(30)
        return read_bytes(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", slow_read)
    paths = []
    first = threading.Thread(target=lambda: paths.append(fetch_to_cache(uri, s3["endpoint"])))
    first.start()
    assert first_in.wait(30)
    second = threading.Thread(target=lambda: paths.append(fetch_to_cache(uri, s3["endpoint"])))
    second.start()
    second.join(3)  # waits on the node lock (before: it was off downloading a copy of its own)
    go_on.set()
    first.join(30)
    second.join(30)
    assert downloads == ["weights.pt"]
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == b"weights"
    waits = [line for line in capsys.readouterr().out.splitlines() if "waiting for" in line]
    assert len(waits) >= 1 and all(
        w.startswith(
            f"[remem] waiting for pid {os.getpid()} on {socket.gethostname()} to finish fetching {uri} "
            "into this node's cache ("
        )
        for w in waits
    ), waits


def test_a_fetch_clears_copies_left_by_fetches_killed_midway_and_a_full_disk_is_one_line(s3, tmp_path, monkeypatch):
    """A fetch killed mid-copy (OOM, SIGKILL) left `<key>.partial-*` behind for good, a dataset's
    size each, until the disk filled; then the write failed with a bare OSError traceback."""
    from remem_ray.storage import fetch_to_cache

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    s3["client"].put_object(Bucket=s3["bucket"], Key="w/weights.pt", Body=b"weights")
    uri = f"s3://{s3['bucket']}/w/weights.pt"
    real_write = Path.write_bytes

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    s3["client"].put_object(Bucket=s3["bucket"], Key="data/train/a.png", Body=b"png")
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    for fetched in (uri, f"s3://{s3['bucket']}/data"):  # a file, a folder
        with pytest.raises(
            ResourceError, match=r"^uri: cannot keep .* in this node's cache .*: No space left on device"
        ):
            fetch_to_cache(fetched, s3["endpoint"])
    monkeypatch.setattr(Path, "write_bytes", real_write)
    folder = tmp_path / "cache" / "s3"
    key = hashlib.sha256(f"{s3['endpoint']}|{uri}".encode()).hexdigest()[:16]  # the file's, as the cache names it
    dead = [folder / f"{key}.partial-{n}" for n in "ab"]
    for partial in dead:  # what two killed fetches of that key left
        partial.mkdir()
        (partial / "weights.pt").write_bytes(b"wei")
    assert fetch_to_cache(uri, s3["endpoint"]).read_bytes() == b"weights"
    assert not any(p.exists() for p in dead) and not list(folder.glob("*.partial-*"))


def test_a_node_lock_waiter_says_whom_it_waits_for_after_a_while_and_every_minute_after(tmp_path):
    import threading

    from remem_ray.storage.cache import node_lock

    lock = tmp_path / "k.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with node_lock(lock, "w", lambda who, s: None):
            held.set()
            assert release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    now, said = [0.0], []

    def clock():  # a second passes at each look
        now[0] += 1.0
        return now[0]

    def waiting(who, seconds):
        said.append((who, seconds))
        if len(said) == 3:
            release.set()

    with node_lock(lock, "w", waiting, poll_s=0.001, clock=clock):
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")  # now this one holds it
    thread.join(30)
    assert said[0] == (f"pid {os.getpid()} on {socket.gethostname()}", 10.0)  # a short wait says nothing
    assert [s for _, s in said] == [10.0, 70.0, 130.0], said
    assert lock.read_text() == ""  # let go: it names nobody


def test_s3_data_and_weights_are_fetched_in_the_specs_region(monkeypatch, tmp_path):
    """The data and the weights on s3:// were fetched in us-east-1 (or the node's AWS_REGION)
    whatever storage.region said: on AWS, a bucket elsewhere failed on every node without the
    variable. Failed before: the fetch got no region. And the identity the driver read (the
    node's copy is kept per identity: storage/identity.py)."""
    import remem_ray.storage
    from remem_ray.config import DataConfig
    from remem_ray.data import build_datasets
    from remem_ray.models import create_model

    asked = []

    def fetch(uri, endpoint=None, field="uri", region=None, identity=None):
        asked.append((field, region, identity))
        raise ResourceError(f"{field}: stop here")

    monkeypatch.setattr(remem_ray.storage, "fetch_to_cache", fetch)
    with pytest.raises(ResourceError, match="data.root: stop here"):
        build_datasets(DataConfig(name="imagefolder", root="s3://b/images", root_identity="d1"), 0, region="eu-west-1")
    with pytest.raises(ResourceError, match="teacher.weights: stop here"):
        create_model(
            "resnet10t", 3, 32, weights="s3://b/w.pt", role="teacher", region="eu-west-1", weights_identity="w1"
        )
    assert asked == [("data.root", "eu-west-1", "d1"), ("teacher.weights", "eu-west-1", "w1")]

    # and a run's loop passes its spec's region on
    from remem_ray.config import load_run_spec
    from remem_ray.contract import LoopConfig
    from remem_ray.train.loop import prepare

    spec = load_run_spec(
        None, {"data.name": "imagefolder", "data.root": "s3://b/images", "storage.region": "eu-west-1"}
    )
    with pytest.raises(ResourceError, match="data.root: stop here"):
        prepare(LoopConfig(spec, str(tmp_path / "out")), "teacher")
    assert asked[-1] == ("data.root", "eu-west-1", None)
    # and the identity of the weights the sweep's driver read (digits: the data is no fetch)
    spec = load_run_spec(
        None, {"teacher.weights": "s3://b/w.pt", "teacher.weights_identity": "w2", "storage.region": "eu-west-1"}
    )
    with pytest.raises(ResourceError, match="teacher.weights: stop here"):
        prepare(LoopConfig(spec, str(tmp_path / "out2")), "teacher").create_model()
    assert asked[-1] == ("teacher.weights", "eu-west-1", "w2")


def test_a_whole_bucket_as_data_or_weights_is_one_line(s3, tmp_path, monkeypatch):
    """s3://bucket (no folder) reached pyarrow as the path '/bucket' and escaped as ArrowInvalid.
    Failed before: that traceback."""
    from remem_ray.storage import fetch_to_cache

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    s3["client"].put_object(Bucket=s3["bucket"], Key="cat/1.png", Body=b"png")
    uri = f"s3://{s3['bucket']}/"
    with pytest.raises(ResourceError, match=rf"^data.root: {uri} is a whole bucket: .* \(s3://{s3['bucket']}/NAME\)$"):
        fetch_to_cache(uri, endpoint=s3["endpoint"], field="data.root")


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_a_failed_local_write_leaves_no_temp_file_behind(tmp_path, monkeypatch, fails):
    """A full disk or a failed rename left `<name>.tmp-XXXX` beside the target, forever."""
    import builtins

    storage = Storage(str(tmp_path))
    if fails == "rename":
        monkeypatch.setattr("os.replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    else:
        real_open = builtins.open

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k)))
    with pytest.raises(ResourceError, match="No space left"):
        storage.write_bytes("state.pt", b"x")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@contextlib.contextmanager
def _served(handler: type[BaseHTTPRequestHandler], monkeypatch) -> Iterator[str]:
    """An S3 endpoint on loopback answered by `handler`, with credentials in the environment."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_s3_object_rewritten_between_its_size_and_its_bytes_reads_whole(monkeypatch):
    """A student's best.json, a lease record, the study's copy: rewritten while others read them.
    A server whose object is replaced by a longer one right after the size was asked (HEAD answers
    the old length, GET serves the new bytes, ranges honoured as S3 does). Before, pyarrow's stream
    read the range of the old length from the new version: a torn JSON."""
    old, new = b'{"epoch": 9, "checkpoint": "best_epoch_9"}', b'{"epoch": 10, "checkpoint": "best_epoch_10", "more": 1}'

    class Replaced(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(old)))
            self.end_headers()

        def do_GET(self) -> None:
            body, status = new, 200
            wanted = self.headers.get("Range")
            if wanted:  # bytes=A-B
                start, end = (int(x) for x in wanted.split("=")[1].split("-"))
                body, status = new[start : end + 1], 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with _served(Replaced, monkeypatch) as endpoint:
        assert Storage("s3://bucket/root", endpoint=endpoint).child("students").read_bytes("best.json") == new


def test_an_s3_input_is_looked_up_quickly_with_only_what_its_run_reads(s3, dead_endpoint, monkeypatch):
    """The entry check of s3:// weights and image folders: the object's own lookup (no bucket
    listing), two attempts on an endpoint that never answers (the runs' client tries 13 times,
    about a minute), and one line for a path pyarrow refuses (`a//b` raised ArrowInvalid, a
    traceback)."""
    import contextlib
    import socket
    import threading

    from remem_ray.errors import ResourceError
    from remem_ray.storage.preflight import preflight_input

    s3["client"].put_object(Bucket=s3["bucket"], Key="w/weights.pt", Body=b"weights")
    s3["client"].put_object(Bucket=s3["bucket"], Key="images/train/a/1.png", Body=b"png")
    bucket, endpoint = s3["bucket"], s3["endpoint"]
    preflight_input(f"s3://{bucket}/w/weights.pt", endpoint, None, "teacher.weights")
    preflight_input(f"s3://{bucket}/images", endpoint, None, "data.root")  # a folder
    with pytest.raises(ResourceError, match=rf"^student\.weights: not found: s3://{bucket}/w/nothere\.pt$"):
        preflight_input(f"s3://{bucket}/w/nothere.pt", endpoint, None, "student.weights")
    with pytest.raises(ResourceError, match=r"^teacher\.weights: not a valid S3 path: s3://.*//w\.pt: "):
        preflight_input(f"s3://{bucket}/a//w.pt", endpoint, None, "teacher.weights")
    with pytest.raises(ResourceError, match=r"^storage: cannot reach the S3 endpoint .* \(teacher\.weights\)"):
        preflight_input(f"s3://{bucket}/w/weights.pt", dead_endpoint, None, "teacher.weights")
    # an endpoint that takes connections and never answers: two attempts of a (here) 1-s request,
    # counted by the connections it takes (the runs' client would make 13), not by a clock
    import sys

    monkeypatch.setattr(
        sys.modules["remem_ray.storage.preflight"], "INPUT_CHECK_REQUEST_S", 1.0
    )  # the package's `preflight` is the function
    silent = socket.create_server(("127.0.0.1", 0))
    held = []

    def take():
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(silent.accept())

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    try:
        with pytest.raises(ResourceError, match=r"^teacher\.weights: cannot reach s3://"):
            preflight_input(
                f"s3://{bucket}/w/weights.pt", f"http://127.0.0.1:{silent.getsockname()[1]}", None, "teacher.weights"
            )
    finally:
        with contextlib.suppress(OSError):
            silent.shutdown(socket.SHUT_RDWR)  # ends the blocked accept (close alone does not)
        silent.close()
        taker.join(5)
    assert 2 <= len(held) <= 3  # the endpoint check (TCP only) and two attempts


def test_preflight_on_aws_refuses_a_region_the_bucket_is_not_in(moto_endpoint, monkeypatch):
    """boto3 follows S3's redirect to a bucket's region, so the check passed; pyarrow, with which
    every run reads and writes, does not, and each trial failed on an HTTP 301. Refused at the door."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    west = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-west-2")
    west.create_bucket(Bucket="west-bucket", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)  # boto3's own setting: no storage.endpoint
    preflight("s3://west-bucket/r", None, "us-east-1")  # a server that is not AWS: regions are its business
    import importlib

    preflight_module = importlib.import_module("remem_ray.storage.preflight")  # the package names the function
    monkeypatch.setattr(preflight_module, "_on_aws", lambda client: True)  # moto, standing in for AWS
    with pytest.raises(
        ResourceError, match=r"^storage\.region: bucket 'west-bucket' of storage\.root s3://west-bucket/r "
    ):
        preflight("s3://west-bucket/r", None, "us-east-1")
    preflight("s3://west-bucket/r", None, "us-west-2")  # its own region passes


def test_only_aws_hosts_count_as_aws():
    from types import SimpleNamespace

    from remem_ray.storage.preflight import _on_aws

    def client(url):
        return SimpleNamespace(meta=SimpleNamespace(endpoint_url=url))

    assert _on_aws(client("https://s3.amazonaws.com")) and _on_aws(client("https://s3.us-west-2.amazonaws.com"))
    assert _on_aws(client("https://s3.cn-north-1.amazonaws.com.cn"))
    assert not _on_aws(client("http://minio.internal:9000")) and not _on_aws(client("http://127.0.0.1:8333"))


def test_pyarrows_word_on_a_bucket_in_another_region_says_which_field_to_set():
    class Elsewhere:
        def get_file_info(self, path):
            raise OSError(
                "When getting information for key 'r/s' in bucket 'b': AWS Error UNKNOWN (HTTP status 301) during "
                "HeadObject operation: No response body. Looks like the configured region is 'us-east-1' while "
                "the bucket is located in 'us-west-2'."
            )

    storage = Storage("s3://b/r")
    storage.fs = Elsewhere()
    with pytest.raises(
        ResourceError, match=r"located in 'us-west-2'\. Set storage\.region in the spec \(or AWS_REGION"
    ):
        storage.exists("s")


def test_an_endpoint_named_by_aws_endpoint_url_s3_is_where_every_write_goes(s3, monkeypatch):
    """boto3 reads AWS_ENDPOINT_URL_S3 (before AWS_ENDPOINT_URL); pyarrow reads neither, and we
    passed it AWS_ENDPOINT_URL only. With the S3 one set, leases (boto3) went to that server and
    checkpoints (pyarrow) to AWS; with both set, ours went to the general one, boto3's elsewhere."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["endpoint"])
    store = Storage(f"s3://{s3['bucket']}/p")
    store.write_bytes("checkpoint.bin", b"weights")  # pyarrow
    assert store.create_exclusive("lease.json", b"{}")  # boto3
    keys = sorted(o["Key"] for o in s3["client"].list_objects_v2(Bucket=s3["bucket"])["Contents"])
    assert keys == ["p/checkpoint.bin", "p/lease.json"] and store.read_bytes("checkpoint.bin") == b"weights"


def test_an_input_checked_at_an_endpoint_from_the_environment_names_that_variable(monkeypatch):
    """A malformed endpoint from AWS_ENDPOINT_URL_S3 was reported under the input's own field
    ("teacher.weights must look like http://host:port"): the user looked for it in the spec."""
    from remem_ray.storage.preflight import preflight_input

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "minio:9000")
    with pytest.raises(ResourceError, match=r"^storage: AWS_ENDPOINT_URL_S3 must look like http://host:port"):
        preflight_input("s3://bucket/weights.pt", None, None, "teacher.weights")


def test_a_profile_naming_an_s3_server_is_refused_at_the_door_with_the_field_to_set(s3, tmp_path, monkeypatch):
    """boto3 reads a profile's endpoint_url, pyarrow does not: leases went to that server and
    checkpoints to AWS (no internet here: every write failed after its retries)."""
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nendpoint_url = {s3['endpoint']}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    root = f"s3://{s3['bucket']}/r"
    with pytest.raises(
        ResourceError, match=rf"^storage\.endpoint: your AWS profile sends S3 requests to {s3['endpoint']}"
    ):
        preflight(root, None, "us-east-1")
    preflight(root, s3["endpoint"], "us-east-1")  # named: both clients go there


def test_an_object_written_and_read_as_a_stream_round_trips(store):
    """Target tables (up to 20 GB) are streamed: never all their bytes in memory beside them."""
    import torch

    table = torch.arange(4096, dtype=torch.float16).view(64, 8, 8)
    store.write_with("targets/t.pt", lambda f: torch.save({"logits": table}, f))
    assert store.is_file("targets/t.pt") and not [n for n in store.list_dir("targets") if ".tmp-" in n]
    read = store.read_with("targets/t.pt", lambda f: torch.load(f, weights_only=True))
    assert torch.equal(read["logits"], table)
    with pytest.raises(ResourceError, match=r"^storage: cannot read .*nothing\.pt"):
        store.read_with("targets/nothing.pt", lambda f: f.read())


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_a_stream_written_in_part_leaves_the_object_as_it_was(store, monkeypatch, interruption):
    """pyarrow's S3 stream completed its upload when closed after an error: a Ctrl-C or an
    exception in torch.save between parts stored the part written under the final name (a resume
    state cut short, which every retry then failed to load). Nothing is stored now, and the object
    there before stays whole; a stream of several parts that ends well is stored whole."""
    from remem_ray.storage import s3_upload

    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 << 20)  # S3's smallest part
    whole = os.urandom(12 << 20)  # three parts
    store.write_with("state.pt", lambda f: (f.write(whole[: 7 << 20]), f.write(whole[7 << 20 :])))
    assert store.read_bytes("state.pt") == whole

    def interrupted(f):
        f.write(b"x" * (11 << 20))  # two parts sent
        raise interruption("stopped mid-stream")

    with pytest.raises(interruption):
        store.write_with("state.pt", interrupted)
    assert store.read_bytes("state.pt") == whole
    with pytest.raises(interruption):
        store.write_with("new.pt", interrupted)
    assert not store.exists("new.pt") and sorted(store.list_dir()) == ["state.pt"]
    if store.is_s3:  # and no upload left open, holding its parts
        bucket, _, prefix = store.path().partition("/")
        assert "Uploads" not in store._boto3().list_multipart_uploads(Bucket=bucket, Prefix=prefix)


def test_an_s3_upload_that_fails_stops_its_writer_at_once_not_at_the_end(s3, monkeypatch):
    """A part refused (here: no such bucket) failed only at commit, after the writer had streamed
    everything (a 20 GB target table computed for nothing); now its next write fails."""
    from remem_ray.storage import s3_upload

    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 << 20)
    storage = Storage(f"s3://{s3['bucket']}-gone/p", endpoint=s3["endpoint"])
    written: list[int] = []

    def stream(f):
        for _ in range(60):
            f.write(b"x" * (1 << 20))
            written.append(1)

    with pytest.raises(ResourceError, match="NoSuchBucket"):
        storage.write_with("table.pt", stream)
    assert len(written) < 30


def test_a_noting_file_writes_in_pieces_flushed_now_and_then_and_notes_only_storage_errors(monkeypatch):
    """pyarrow copies what one write hands it and uploads behind: torch.save handed it a 20 GB
    table in one write, queueing 20 GB of copies. And torch.load asks questions (fileno) whose
    UnsupportedOperation is no failure, and falls back from readinto to read after a real one."""
    import io
    from types import SimpleNamespace

    from remem_ray.storage import fs as fs_module
    from remem_ray.storage.fs import NotingFile

    class Sink(io.BytesIO):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def write(self, data):
            self.calls.append(f"write {len(data)}")
            return super().write(data)

        def flush(self):
            self.calls.append("flush")

    monkeypatch.setattr(fs_module, "S3_FLUSH_EVERY", 8)
    sink = Sink()
    assert NotingFile(sink, chunk=4).write(b"0123456789") == 10
    assert sink.getvalue() == b"0123456789"
    assert sink.calls == ["write 4", "write 4", "flush", "write 2"]
    noting = NotingFile(io.BytesIO(b"abc"))
    with pytest.raises(io.UnsupportedOperation):
        noting.fileno()
    assert noting.failed is None
    broken = NotingFile(SimpleNamespace(read=lambda n: (_ for _ in ()).throw(OSError("reset")), seek=lambda n: n))
    with pytest.raises(OSError):
        broken.read(1)
    broken.seek(0)  # no data moved: still failed
    assert str(broken.failed) == "reset"


def test_files_lists_a_folders_tree_with_sizes_and_stamp_changes_with_a_rewrite(store):
    store.write_bytes("d/a.png", b"12345")
    store.write_bytes("d/sub/b.jpg", b"12")
    store.write_bytes("other.txt", b"x")
    assert store.files("d") == [("a.png", 5), ("sub/b.jpg", 2)]
    assert store.files("missing") == []
    first = store.stamp("d/a.png")
    assert first is not None and first.startswith("5@")
    store.write_bytes("d/a.png", b"123456")
    assert store.stamp("d/a.png") not in (None, first)
    assert store.stamp("d/nothing.png") is None and store.stamp("d") is None


def test_an_s3_object_changed_since_a_fetch_is_fetched_again_under_its_new_identity(s3, tmp_path, monkeypatch):
    """The node's copy was keyed by URI alone: weights uploaded anew under the same name were
    never fetched again on a node that had the old ones (failed before: no identity to key by)."""
    from remem_ray.storage import fetch_to_cache
    from remem_ray.storage.identity import file_identity

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3['bucket']}/w/weights.pt"
    s3["client"].put_object(Bucket=s3["bucket"], Key="w/weights.pt", Body=b"old weights")
    old = file_identity(uri, s3["endpoint"])
    assert fetch_to_cache(uri, s3["endpoint"], identity=old).read_bytes() == b"old weights"
    s3["client"].put_object(Bucket=s3["bucket"], Key="w/weights.pt", Body=b"new weights!")
    new = file_identity(uri, s3["endpoint"])
    assert new != old
    assert fetch_to_cache(uri, s3["endpoint"], identity=new).read_bytes() == b"new weights!"
    assert fetch_to_cache(uri, s3["endpoint"], identity=old).read_bytes() == b"old weights"  # kept, not refetched


def test_a_fetch_for_an_identity_the_object_no_longer_has_keeps_no_copy(s3, tmp_path, monkeypatch):
    """Changed between the run's start and a node's fetch, the new content was kept under the old
    identity's name, for good (a review's find; failed before: the copy was kept)."""
    from remem_ray.storage import fetch_to_cache
    from remem_ray.storage.identity import file_identity, folder_identity

    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    put = functools.partial(s3["client"].put_object, Bucket=s3["bucket"])
    put(Key="w/weights.pt", Body=b"old")
    put(Key="images/cat/1.png", Body=b"aa")
    weights, images = f"s3://{s3['bucket']}/w/weights.pt", f"s3://{s3['bucket']}/images"
    began = file_identity(weights, s3["endpoint"]), folder_identity(images, s3["endpoint"])
    put(Key="w/weights.pt", Body=b"newer")
    put(Key="images/dog/2.png", Body=b"b")
    for uri, identity, field in ((weights, began[0], "teacher.weights"), (images, began[1], "data.root")):
        with pytest.raises(ResourceError, match=rf"^{field}: {uri} changed since this sweep \(or run\) read it"):
            fetch_to_cache(uri, s3["endpoint"], field=field, identity=identity)
    assert not [p for p in (tmp_path / "cache" / "s3").iterdir() if p.is_dir()]  # no copy, no staging left
