"""A node-local cache: s3:// files and folders fetched once (weights, datasets), and the data stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from remem_ray.errors import ResourceError
from remem_ray.storage.fs import Storage, s3_filesystem, split_s3_uri


def cache_root() -> Path:
    """$REMEM_CACHE_DIR, else ~/.cache/remem-ray; read at call time (workers and tests set it after import)."""
    return Path(os.environ.get("REMEM_CACHE_DIR", Path.home() / ".cache" / "remem-ray"))


def fetch_to_cache(uri: str, endpoint: str | None = None, field: str = "uri") -> Path:
    """Fetch an s3:// file or folder once into the local cache; later calls reuse it."""
    key = hashlib.sha256(f"{endpoint or ''}|{uri}".encode()).hexdigest()[:16]
    dest = cache_root() / "s3" / key
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
