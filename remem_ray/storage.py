"""The one storage layer: a local folder or s3://bucket/prefix through pyarrow.fs.

Credentials come only from the environment or the instance role (pyarrow's default chain);
nothing here takes or writes keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from remem_ray.errors import ResourceError

CACHE_DIR = Path(os.environ.get("REMEM_CACHE_DIR", Path.home() / ".cache" / "remem-ray"))


def s3_filesystem(endpoint: str | None = None, region: str = "us-east-1") -> pafs.S3FileSystem:
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    kwargs: dict = {
        "region": region,
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=4),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs)


def split_s3_uri(uri: str) -> str:
    """s3://bucket/key -> bucket/key (pyarrow's path form)."""
    return uri[len("s3://"):].strip("/")


class Storage:
    """A root folder on a pyarrow filesystem; every path below is relative to it."""

    def __init__(self, root: str, endpoint: str | None = None, region: str = "us-east-1") -> None:
        self.is_s3 = root.startswith("s3://")
        self.endpoint = endpoint
        if self.is_s3:
            self.fs: pafs.FileSystem = s3_filesystem(endpoint, region)
            self.base = split_s3_uri(root)
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root).expanduser().resolve())

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
        sub.is_s3, sub.endpoint, sub.fs, sub.base = self.is_s3, self.endpoint, self.fs, self.path(*parts)
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
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise self._error("write", rel, exc) from None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

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
