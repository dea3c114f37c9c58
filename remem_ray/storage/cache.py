"""A node-local cache: s3:// files and folders fetched once (weights, datasets), and the data stores."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.fs as pafs

from remem_ray.console import say
from remem_ray.errors import ResourceError
from remem_ray.storage.fs import Storage, s3_filesystem, split_s3_uri, stamp_of
from remem_ray.storage.identity import folder_identity


def cache_root() -> Path:
    """$REMEM_CACHE_DIR, else ~/.cache/remem-ray; read at call time (workers and tests set it after import)."""
    return Path(os.environ.get("REMEM_CACHE_DIR", Path.home() / ".cache" / "remem-ray"))


# While another process of the node fetches what this one needs: a line now and then, naming it
# (a big dataset takes minutes; a stalled one otherwise held the node's other ranks in silence).
# A short wait, the usual one, says nothing.
WAIT_NOTICE_AFTER_S = 10.0
WAIT_NOTICE_EVERY_S = 60.0


def _try_flock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def node_lock(
    path: Path,
    doing: str,
    waiting: Callable[[str, float], None] | None = None,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """An exclusive lock on `path` among this node's processes (flock: freed if the holder dies),
    while the holder is `doing` something once for the node. The holder writes who it is into the
    file (and clears it as it lets go); a waiter calls `waiting(holder, seconds waited)` (by
    default a console line) once it has waited WAIT_NOTICE_AFTER_S, then every WAIT_NOTICE_EVERY_S."""
    waiting = waiting or _say_waiting(doing)
    with open(path, "a+") as f:
        if not _try_flock(f):
            began = clock()
            next_notice = began + WAIT_NOTICE_AFTER_S
            while not _try_flock(f):
                time.sleep(poll_s)
                now = clock()
                if now >= next_notice:
                    next_notice = now + WAIT_NOTICE_EVERY_S
                    waiting(_holder_of(path), now - began)
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            yield
        finally:
            f.truncate(0)  # a waiter reading it from now on names no process that let go
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder_of(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _say_waiting(doing: str) -> Callable[[str, float], None]:
    def waiting(holder: str, seconds: float) -> None:
        say(f"waiting for {holder} to finish {doing} ({seconds:.0f} s so far)")

    return waiting


def fetch_to_cache(
    uri: str, endpoint: str | None = None, field: str = "uri", region: str | None = None, identity: str | None = None
) -> Path:
    """Fetch an s3:// file or folder once into the local cache; later calls reuse it.

    One fetch per node: every DDP rank and every trial on a node asks at once, and each fetching
    its own copy multiplied the traffic; worse, one finishing second removed the folder another had
    just put in place and was reading. The others wait on a node lock and then reuse the copy.
    identity: what the sweep's driver found at the URI (storage/identity.py): a copy is kept per
    identity, so an object changed since an earlier fetch is fetched again."""
    named = f"{endpoint or ''}|{uri}" + (f"|{identity}" if identity else "")
    key = hashlib.sha256(named.encode()).hexdigest()[:16]
    dest = cache_root() / "s3" / key
    done = dest / ".complete"
    if done.exists():
        return Path(done.read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with node_lock(dest.parent / f"{key}.lock", f"fetching {uri} into this node's cache"):
        if done.exists():  # fetched while this one waited
            return Path(done.read_text())
        return _fetch(uri, endpoint, region, field, dest, identity)


def fetchable(
    uri: str, endpoint: str | None, field: str, region: str | None = None, fs: pafs.S3FileSystem | None = None
) -> pafs.FileInfo:
    """What fetch_to_cache finds at an s3:// URI (a file or a folder), or its one-line
    ResourceError naming the field: a whole bucket, unreachable, not found. `fs`: another client
    (a quick check's, with fewer attempts)."""
    path = split_s3_uri(uri)
    if "/" not in path:  # pyarrow cannot address a bucket's root as a folder of another
        raise ResourceError(f"{field}: {uri} is a whole bucket: put the files in a folder of it (s3://{path}/NAME)")
    fs = fs or s3_filesystem(endpoint, region)
    try:
        info = fs.get_file_info(path)
    except ValueError as exc:  # pyarrow's ArrowInvalid, e.g. an empty part (a//b)
        raise ResourceError(f"{field}: not a valid S3 path: {uri}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        reason = str(exc).splitlines()[0]
        if "ACCESS_DENIED" in reason or "HTTP status 403" in reason:
            raise ResourceError(
                f"{field}: access denied to {uri}: check the credentials and the bucket's policy ({reason})"
            ) from None
        raise ResourceError(f"{field}: cannot reach {uri}: {reason}") from None
    if info.type == pafs.FileType.NotFound:
        raise ResourceError(f"{field}: not found: {uri}")
    return info


def _fetch(
    uri: str, endpoint: str | None, region: str | None, field: str, dest: Path, identity: str | None = None
) -> Path:
    """Download into a staging folder, then move it into place whole (under the node lock). A
    copy kept for `identity` is checked to be that (the object changed after the run's start
    read it: kept, the copy named for the old content would hold the new one for good)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    path = split_s3_uri(uri)
    info = fetchable(uri, endpoint, field, region)
    if identity and info.type == pafs.FileType.File and stamp_of(info) != identity:
        raise _changed(field, uri)
    for dead in dest.parent.glob(f"{dest.name}.partial-*"):  # fetches killed mid-copy (we hold the lock)
        shutil.rmtree(dead, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{dest.name}.partial-"))
    try:
        parent, _, base = path.rpartition("/")
        store = Storage(f"s3://{parent}", endpoint, region)
        if info.type == pafs.FileType.File:
            data = store.read_bytes(base)
            (staging / name).write_bytes(data)
        else:
            store.download_dir(base, staging / name)
            if identity and folder_identity(str(staging / name)) != identity:
                raise _changed(field, uri)
        result = dest / name
        (staging / ".complete").write_text(str(result))
        shutil.rmtree(dest, ignore_errors=True)  # a partial copy from a fetch that crashed mid-move
        os.replace(staging, dest)
    except OSError as exc:  # the local disk: full, or the cache folder not writable
        shutil.rmtree(staging, ignore_errors=True)
        reason = exc.strerror or str(exc).splitlines()[0]
        raise ResourceError(f"{field}: cannot keep {uri} in this node's cache {dest.parent}: {reason}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _changed(field: str, uri: str) -> ResourceError:
    return ResourceError(
        f"{field}: {uri} changed since this sweep (or run) read it as it began; start a new one to train from it"
    )
