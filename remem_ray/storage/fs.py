"""Storage: a root folder on a local or S3 filesystem (pyarrow.fs), and whole-object reads and writes."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import pyarrow.fs as pafs

from remem_ray.config import default_region
from remem_ray.errors import ResourceError
from remem_ray.storage import s3_upload
from remem_ray.storage.s3_upload import S3Upload

T = TypeVar("T")

S3_MAX_ATTEMPTS = 13


_BOTO3_LOCK = threading.Lock()


# boto3's order: the S3 service's own setting first. pyarrow reads neither, so we pass it the one found
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def endpoint_from_env() -> tuple[str, str] | None:
    """(endpoint, the variable naming it) from the environment; None where none is set."""
    return next(((os.environ[name], name) for name in ENDPOINT_ENV if os.environ.get(name)), None)


def endpoint_or_env(endpoint: str | None) -> str | None:
    """The S3 endpoint to use: the one given, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else
    None (AWS itself). boto3 and pyarrow must agree: with only AWS_ENDPOINT_URL_S3 set, boto3 went
    to it (leases) while pyarrow went to AWS (checkpoints)."""
    found = endpoint_from_env()
    return endpoint or (found[0] if found else None)


def s3_filesystem(
    endpoint: str | None = None,
    region: str | None = None,
    max_attempts: int | None = None,
    request_timeout_s: float = 30,
) -> pafs.S3FileSystem:
    """pyarrow's S3 client; max_attempts None: ride out about a minute of outage (below)."""
    endpoint = endpoint_or_env(endpoint)
    kwargs: dict = {
        "region": region or default_region(),
        "connect_timeout": 5,
        "request_timeout": request_timeout_s,
        # exponential backoff (capped at 20 s a wait) over 13 attempts rides out about a minute of
        # S3 outage. Copies pickled into Ray's workers (Tune's syncs, Train's checkpoint uploads)
        # lose it (pyarrow does not pickle it) and try 3 times; Train's and Tune's retries take over.
        # Keeping it there was tried: in one of three runs of the S3 outage test a trial then never
        # ended after an S3 restart (its last sync in retries, most likely), so it stays as it was.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts or S3_MAX_ATTEMPTS),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs)


def split_s3_uri(uri: str) -> str:
    """s3://bucket/key -> bucket/key (pyarrow's path form)."""
    return uri[len("s3://") :].strip("/")


@contextlib.contextmanager
def _temp_beside(target: str, data: bytes | Callable[[BinaryIO], object]) -> Iterator[str]:
    """A finished, fsynced temp file next to `target` (of `data`, or of what `data(file)` writes),
    to be renamed or linked into place inside the block; whatever is left of it afterwards is
    removed (a failed write or rename, a full disk)."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(OSError):  # renamed into place: nothing left
            os.unlink(tmp)


S3_WRITE_CHUNK = 64 << 20  # the upload copies what one write hands it, and uploads parts behind: pieces
S3_FLUSH_EVERY = 256 << 20  # and a look at the upload's health now and then


class NotingFile:
    """A file whose last OSError is noted (`failed`; None once data moves again): a reader or
    writer that catches every error (torch.load reports a failed read as a corrupt file) cannot
    tell storage's failures from the content's without it. With `chunk`, writes go in pieces of
    that size, flushed every S3_FLUSH_EVERY bytes: one write of 20 GB queued 20 GB of copies."""

    def __init__(self, file, chunk: int | None = None) -> None:
        self.file, self.chunk, self.failed = file, chunk, None
        self._unflushed = 0

    def __getattr__(self, name: str):
        attr = getattr(self.file, name)
        return self._noted(attr, name) if callable(attr) else attr

    def write(self, data) -> int:
        if self.chunk is None:
            return self._noted(self.file.write, "write")(data)
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.chunk):
            piece = view[start : start + self.chunk]
            self._noted(self.file.write, "write")(piece)
            self._unflushed += len(piece)
            if self._unflushed >= S3_FLUSH_EVERY:
                self._noted(self.file.flush, "flush")()
                self._unflushed = 0
        return len(view)

    def _noted(self, call, name: str):
        def noted(*args, **kwargs):
            try:
                result = call(*args, **kwargs)
            except OSError as exc:
                if not isinstance(exc, io.UnsupportedOperation):  # a question asked, not a failure
                    self.failed = exc
                raise
            if name in ("read", "readinto", "write"):  # data moved: recovered (torch falls back
                self.failed = None  # from readinto to read), where a seek after a failure is not
            return result

        return noted


class Storage:
    """A root folder on a pyarrow filesystem; every path below is relative to it."""

    def __init__(self, root: str, endpoint: str | None = None, region: str | None = None) -> None:
        self.is_s3 = root.startswith("s3://")
        self.endpoint, self.region = endpoint, region or default_region()
        self._clients: dict = {}  # its boto3 client, made on first use and shared with its children
        if self.is_s3:
            self.fs: pafs.FileSystem = s3_filesystem(endpoint, self.region)
            self.base = split_s3_uri(root)
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).expanduser().resolve())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_clients": {}}  # boto3 clients do not pickle; made again on use

    @classmethod
    def from_config(cls, cfg) -> Storage:
        return cls(cfg.root, cfg.endpoint, cfg.region)

    # ----------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def uri(self, *parts: str) -> str:
        return f"s3://{self.path(*parts)}" if self.is_s3 else self.path(*parts)

    def child(self, *parts: str) -> Storage:
        """A Storage rooted at a sub-folder, sharing this filesystem."""
        sub = object.__new__(Storage)
        sub.is_s3, sub.endpoint, sub.region, sub.fs = self.is_s3, self.endpoint, self.region, self.fs
        sub.base, sub._clients = self.path(*parts), self._clients
        return sub

    # ----------------------------------------------------------------- queries
    def _info(self, rel: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(rel))
        except OSError as exc:
            raise self._error("read", rel, exc) from None

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def list_dir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        except OSError as exc:
            raise self._error("list", rel, exc) from None
        return sorted(i.base_name for i in infos)

    def files(self, rel: str = "") -> list[tuple[str, int]]:
        """Every file under the folder `rel`, as (its path below `rel`, '/'-separated; its size),
        sorted by path; [] where there is no such folder."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True))
        except (OSError, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid (a bad path)
            raise self._error("list", rel, exc) from None
        prefix = self.path(rel).rstrip("/") + "/"
        return sorted((i.path[len(prefix) :], i.size) for i in infos if i.type == pafs.FileType.File)

    def stamp(self, rel: str) -> str | None:
        """A file's size and modification time ('SIZE@MTIME_NS'): a rewrite or a new upload under
        the same name changes it. None where there is no such file."""
        info = self._info(rel)
        return stamp_of(info) if info.type == pafs.FileType.File else None

    # ----------------------------------------------------------------- bytes
    def read_bytes(self, rel: str) -> bytes:
        try:
            if self.is_s3:
                return self._get_object(self.path(rel))
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except (OSError, FileNotFoundError) as exc:
            raise self._error("read", rel, exc) from None

    def _get_object(self, target: str) -> bytes:
        """One GET: pyarrow's stream asks for the size first (HEAD) and then GETs that range, so a
        file rewritten between the two (a student's best.json, the study's copy, a lease record)
        read torn: the new version cut to the old length, or padded."""
        import botocore.exceptions

        bucket, _, key = target.partition("/")
        try:
            return self._boto3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no such object {target}") from None
            raise OSError(one_line(exc)) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise OSError(one_line(exc)) from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write: an S3 upload shows only once complete (under a part's size, one PUT:
        lease records and small files pay no upload threads); locally a temp file is renamed over
        the target."""
        if self.is_s3 and len(data) < s3_upload.PART_SIZE:
            try:
                self._put_whole(self.path(rel), data)
            except OSError as exc:
                raise self._error("write", rel, exc) from None
            return
        self.write_with(rel, lambda f: f.write(data))

    def write_with(self, rel: str, write: Callable[[NotingFile], object]) -> None:
        """A whole object that `write(file)` writes as a stream, never all in memory at once (a
        target table of 20 GB): on S3 an upload that shows only once complete; locally a temp
        file renamed over the target. A `write` that fails, or a stream that fails under it,
        leaves nothing new under `rel`: on S3 the upload is aborted (storage/s3_upload.py).
        A failed write of the stream raises ResourceError, whatever `write` made of it
        (torch.save turns a full disk into a RuntimeError of its own)."""
        target = self.path(rel)
        streams: list[NotingFile] = []

        def noted(f) -> object:
            streams.append(NotingFile(f, chunk=S3_WRITE_CHUNK if self.is_s3 else None))
            return write(streams[-1])

        try:
            if self.is_s3:
                self._upload(target, noted)
                return
            with _temp_beside(target, noted) as tmp:
                os.replace(tmp, target)
        except OSError as exc:
            raise self._error("write", rel, exc) from None
        except Exception:
            if streams and streams[-1].failed is not None:
                raise self._error("write", rel, streams[-1].failed) from None
            raise

    def _upload(self, target: str, write: Callable[[S3Upload], object]) -> None:
        """`write(stream)` into an S3 upload that stores the object only once it returned."""
        bucket, _, key = target.partition("/")
        upload = S3Upload(self._boto3(), bucket, key)
        try:
            write(upload)
        except BaseException as exc:  # a KeyboardInterrupt mid-stream too: no part of it is stored
            upload.abort(exc)
            raise
        upload.commit()

    def read_with(self, rel: str, read: Callable[[NotingFile], T]) -> T:
        """`read(file)` on a seekable stream of the object, never all of it in memory at once.
        Ranged reads: for objects written once (a reread of one rewritten meanwhile may mix the two).
        `read` is handed a NotingFile: its `failed` tells a storage error from a bad file."""
        try:
            with self.fs.open_input_file(self.path(rel)) as f:
                return read(NotingFile(f))
        except (OSError, FileNotFoundError) as exc:
            raise self._error("read", rel, exc) from None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write a whole object only if nothing is there yet; False if something is.

        Of any number of concurrent callers exactly one succeeds (leases are built on it):
        locally a hard link of a finished temp file (atomic, also on NFS); on S3 a PUT with
        If-None-Match: *, which AWS S3 and SeaweedFS refuse with 412 when the key exists.
        """
        target = self.path(rel)
        try:
            if self.is_s3:
                return self._put_if_absent(target, data)
            with _temp_beside(target, data) as tmp:
                try:
                    os.link(tmp, target)
                    return True
                except FileExistsError:
                    return False
        except OSError as exc:
            raise self._error("write", rel, exc) from None

    def _put_whole(self, target: str, data: bytes) -> None:
        import botocore.exceptions

        bucket, _, key = target.partition("/")
        try:
            self._boto3().put_object(Bucket=bucket, Key=key, Body=data)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise OSError(one_line(exc)) from None

    def _put_if_absent(self, target: str, data: bytes) -> bool:
        import botocore.exceptions

        bucket, _, key = target.partition("/")
        try:
            self._boto3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            # 409: a concurrent conditional write to the same key is in flight; it wins
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise OSError(one_line(exc)) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise OSError(one_line(exc)) from None

    def _boto3(self):
        """boto3 for what pyarrow's filesystem cannot say (conditional writes, deletes that leave no
        folder marker); same credential chain. Made once, under a lock and from a session of its
        own: boto3's default session is not safe to make clients from in several threads (a lease's
        renewer thread and the loop's both write). One per Storage and its children: making one
        takes about 0.1 s of CPU, and readers poll."""
        with _BOTO3_LOCK:
            if "s3" not in self._clients:
                import boto3
                import botocore.config

                config = botocore.config.Config(
                    connect_timeout=5, read_timeout=30, retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
                )
                endpoint = endpoint_or_env(self.endpoint)
                session = boto3.session.Session()
                self._clients["s3"] = session.client(
                    "s3", endpoint_url=endpoint, region_name=self.region, config=config
                )
            return self._clients["s3"]

    # ----------------------------------------------------------------- folders
    def upload_dir(self, local_dir: str | Path, rel: str) -> None:
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file():
                self.write_bytes(f"{rel}/{file.relative_to(local_dir).as_posix()}", file.read_bytes())

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True))
        except (OSError, FileNotFoundError) as exc:
            raise self._error("read", rel, exc) from None
        prefix = self.path(rel).rstrip("/") + "/"
        for info in infos:
            if info.type == pafs.FileType.File:
                name = info.path[len(prefix) :]
                try:
                    with self.fs.open_input_stream(info.path) as f:
                        data = f.read()
                except OSError as exc:
                    raise self._error("read", f"{rel}/{name}", exc) from None
                dest = local_dir / name  # the local disk's errors are the caller's to name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        return local_dir

    def delete_file(self, rel: str) -> None:
        """Remove one file; a missing one is no error. On S3 a plain DeleteObject: pyarrow's
        delete_file also writes an empty marker object for the parent folder, which would be left
        in folders users ship (an export's)."""
        try:
            if self.is_s3:
                self._delete_object(self.path(rel))
            else:
                os.unlink(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("delete", rel, exc) from None

    def _delete_object(self, target: str) -> None:
        import botocore.exceptions

        bucket, _, key = target.partition("/")
        try:
            self._boto3().delete_object(Bucket=bucket, Key=key)  # idempotent: a missing key is a success
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise OSError(one_line(exc)) from None

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            try:
                self.fs.delete_dir(self.path(rel))
            except OSError as exc:
                raise self._error("delete", rel, exc) from None

    def _error(self, verb: str, rel: str, exc: BaseException) -> ResourceError:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Looks like the configured region is" in reason:  # pyarrow's words for a bucket elsewhere
            reason += " Set storage.region in the spec (or AWS_REGION where a verb reads a stored sweep)."
        return ResourceError(f"storage: cannot {verb} {self.uri(rel)}: {reason}")


def stamp_of(info: pafs.FileInfo) -> str:
    """A file's size and modification time, as `Storage.stamp` gives them."""
    return f"{info.size}@{info.mtime_ns}"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
