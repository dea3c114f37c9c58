"""The one storage layer: a local folder or s3://bucket/prefix through pyarrow.fs.

Credentials come only from the environment or the instance role (pyarrow's default chain);
nothing here takes or writes keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from remem_ray.errors import ResourceError

CACHE_DIR = Path(os.environ.get("REMEM_CACHE_DIR", Path.home() / ".cache" / "remem-ray"))
S3_MAX_ATTEMPTS = 13
PREFLIGHT_TIMEOUT_S = 3.0  # connect timeout of the preflight: a dead endpoint fails in seconds, not minutes


def s3_filesystem(endpoint: str | None = None, region: str = "us-east-1") -> pafs.S3FileSystem:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    kwargs: dict = {
        "region": region,
        "connect_timeout": 5,
        "request_timeout": 30,
        # Ray's checkpoint uploads and Tune's syncs use this filesystem too: exponential backoff
        # (capped at 20 s a wait) over 13 attempts rides out about a minute of S3 outage.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs)


def split_s3_uri(uri: str) -> str:
    """s3://bucket/key -> bucket/key (pyarrow's path form)."""
    return uri[len("s3://"):].strip("/")


def _write_temp_beside(target: str, data: bytes) -> str:
    """A finished, fsynced temp file next to `target`, to be renamed or linked into place."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class Storage:
    """A root folder on a pyarrow filesystem; every path below is relative to it."""

    def __init__(self, root: str, endpoint: str | None = None, region: str = "us-east-1") -> None:
        self.is_s3 = root.startswith("s3://")
        self.endpoint, self.region = endpoint, region
        self._client = None
        if self.is_s3:
            self.fs: pafs.FileSystem = s3_filesystem(endpoint, region)
            self.base = split_s3_uri(root)
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).expanduser().resolve())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}  # boto3 clients do not pickle; made again on use

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
        sub.base, sub._client = self.path(*parts), None
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

    # ----------------------------------------------------------------- bytes
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except (OSError, FileNotFoundError) as exc:
            raise self._error("read", rel, exc) from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write: an S3 PUT is atomic; locally a temp file is renamed over the target."""
        target = self.path(rel)
        try:
            if self.is_s3:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
                return
            os.replace(_write_temp_beside(target, data), target)
        except OSError as exc:
            raise self._error("write", rel, exc) from None

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
            tmp = _write_temp_beside(target, data)
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise self._error("write", rel, exc) from None

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
            raise OSError(_one_line(exc)) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise OSError(_one_line(exc)) from None

    def _boto3(self):
        """boto3 for what pyarrow's filesystem cannot say (conditional writes); same credential chain."""
        if self._client is None:
            import boto3
            import botocore.config

            config = botocore.config.Config(connect_timeout=5, read_timeout=30,
                                            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
            endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
            self._client = boto3.client("s3", endpoint_url=endpoint, region_name=self.region, config=config)
        return self._client

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
                dest = local_dir / info.path[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as f:
                    dest.write_bytes(f.read())
        return local_dir

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("delete", rel, exc) from None

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            try:
                self.fs.delete_dir(self.path(rel))
            except OSError as exc:
                raise self._error("delete", rel, exc) from None

    def _error(self, verb: str, rel: str, exc: BaseException) -> ResourceError:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ResourceError(f"storage: cannot {verb} {self.uri(rel)}: {reason}")


# --------------------------------------------------------------------------- preflight
#
# Runs before anything is written and before Ray starts, so a bad root, a dead endpoint,
# missing credentials or a missing bucket end in one line naming the field, not in a trace
# from deep inside a trial. It only reads: nothing is created, locally or in the bucket.


def preflight(root: str, endpoint: str | None = None, region: str = "us-east-1", *,
              root_field: str = "storage.root", endpoint_field: str = "storage.endpoint",
              writable: bool = True) -> None:
    """Prove a storage root usable, or raise a one-line ResourceError naming the field.

    s3:// roots: the endpoint answers, credentials resolve and the bucket exists and lets us in.
    Local roots (only when `writable`): the root is a folder, or can be created as one.
    """
    if root.startswith("s3://"):
        _preflight_s3(root, endpoint, region, root_field, endpoint_field)
    elif writable:
        _preflight_local(root, root_field)


def preflight_config(cfg, writable: bool = True) -> None:
    """preflight() for a spec's StorageConfig (storage.root, storage.endpoint, storage.region)."""
    preflight(cfg.root, cfg.endpoint, cfg.region, writable=writable)


def _preflight_local(root: str, field: str) -> None:
    path = Path(root).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ResourceError(f"storage: {field} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ResourceError(f"storage: {field} {path} is not writable")
        return
    ancestor = next(p for p in path.parents if p.exists())  # "/" always exists
    if not ancestor.is_dir():
        raise ResourceError(f"storage: cannot create {field} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ResourceError(f"storage: cannot create {field} {path}: {ancestor} is not writable")


def _preflight_s3(root: str, endpoint: str | None, region: str, root_field: str, endpoint_field: str) -> None:
    if not endpoint and os.environ.get("AWS_ENDPOINT_URL"):
        endpoint, endpoint_field = os.environ["AWS_ENDPOINT_URL"], "AWS_ENDPOINT_URL"
    if endpoint:  # AWS itself is left to the bucket check: its endpoint depends on region and proxies
        _check_endpoint(endpoint, endpoint_field)
    session = _aws_session(root, root_field)
    _check_bucket(session, root, endpoint, region, root_field)


def _check_endpoint(endpoint: str, field: str) -> None:
    """A TCP connect with a short timeout: pyarrow would retry a dead endpoint for minutes."""
    url = urlsplit(endpoint)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a port that is not a number or out of range
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        # --endpoint and AWS_ENDPOINT_URL reach here unvalidated (the spec's field is checked earlier)
        raise ResourceError(f"storage: {field} must look like http://host:port or https://host, got {endpoint!r}")
    try:
        socket.create_connection((url.hostname, port), timeout=PREFLIGHT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or _one_line(exc)
        raise ResourceError(f"storage: cannot reach the S3 endpoint {endpoint} ({field}): {reason}") from None


def _aws_session(root: str, field: str):
    """A boto3 session whose credential chain resolves: environment, profile files or an instance role.

    boto3's chain matches what pyarrow uses; its instance-metadata lookup times out after 1 s
    off EC2 (and is skipped with AWS_EC2_METADATA_DISABLED=true).
    """
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:  # e.g. AWS_PROFILE names a missing profile
        raise ResourceError(f"storage: cannot load AWS credentials for {field} {root}: {_one_line(exc)}") from None
    if credentials is None:
        raise ResourceError(f"storage: no AWS credentials for {field} {root}: set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role provides them")
    return session


def _check_bucket(session, root: str, endpoint: str | None, region: str, field: str) -> None:
    """List at most one key under the root: the call the storage layer itself needs first.

    Not HeadBucket: least-privilege policies often grant ListBucket only under a prefix,
    which HEAD (no prefix) fails although the sweep would work.
    """
    import botocore.config
    import botocore.exceptions

    bucket, _, prefix = split_s3_uri(root).partition("/")
    config = botocore.config.Config(connect_timeout=PREFLIGHT_TIMEOUT_S, read_timeout=10,
                                    retries={"max_attempts": 2, "mode": "standard"})
    client = session.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)
    where = f" at {endpoint}" if endpoint else ""
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
    except botocore.exceptions.ClientError as exc:
        raise bucket_error(exc, bucket, root, field, where) from None
    except botocore.exceptions.BotoCoreError as exc:  # no route to AWS, timeouts, bad TLS
        raise ResourceError(f"storage: cannot reach bucket {bucket!r}{where} for {field} {root}: "
                            f"{_one_line(exc)}") from None


def bucket_error(exc, bucket: str, root: str, field: str, where: str = "") -> ResourceError:
    """The one-line error for a failed request to the bucket (a botocore ClientError)."""
    status = str(exc.response.get("Error", {}).get("Code", "")) or "?"
    if status in ("404", "NoSuchBucket", "NotFound"):
        return ResourceError(f"storage: bucket {bucket!r} of {field} {root} does not exist{where}")
    if status in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return ResourceError(f"storage: access denied to bucket {bucket!r} of {field} {root}{where} ({status}): "
                             f"check the credentials and the bucket's policy")
    return ResourceError(f"storage: cannot use bucket {bucket!r} of {field} {root}{where}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def fetch_to_cache(uri: str, endpoint: str | None = None, field: str = "uri") -> Path:
    """Fetch an s3:// file or folder once into the local cache; later calls reuse it."""
    key = hashlib.sha256(f"{endpoint or ''}|{uri}".encode()).hexdigest()[:16]
    dest = CACHE_DIR / "s3" / key
    done = dest / ".complete"
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if done.exists():
        return Path(done.read_text())
    fs = s3_filesystem(endpoint)
    path = split_s3_uri(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise ResourceError(f"{field}: cannot reach {uri}: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise ResourceError(f"{field}: not found: {uri}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{key}.partial-"))
    try:
        parent, _, base = path.rpartition("/")
        store = Storage(f"s3://{parent}", endpoint)
        if info.type == pafs.FileType.File:
            (staging / name).write_bytes(store.read_bytes(base))
            result = dest / name
        else:
            store.download_dir(base, staging / name)
            result = dest / name
        (staging / ".complete").write_text(str(result))
        if done.exists():  # another process (a DDP rank, a trial on this node) finished first
            shutil.rmtree(staging, ignore_errors=True)
            return Path(done.read_text())
        shutil.rmtree(dest, ignore_errors=True)  # a partial copy from a crashed fetch
        try:
            os.replace(staging, dest)
        except OSError:
            if not done.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
