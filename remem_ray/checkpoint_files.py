"""Checkpoint folders without torch: names, the manifest and integrity checks.

A folder holds model.pt, meta.json and, written last, manifest.json with each file's sha256, so
a folder without one is unfinished and a file that does not match is corrupt. Trial drivers
only check and locate checkpoints: keeping torch out of this module keeps it out of them.
"""

from __future__ import annotations

import hashlib
import json

from remem_ray.errors import ResourceError
from remem_ray.storage import Storage

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ResourceError):
    """A checkpoint folder is missing, unfinished or corrupt."""


def checkpoint_name(epoch: int) -> str:
    """A teacher's checkpoint folder for one saved epoch."""
    return f"epoch_{epoch}"


def manifest_for(files: dict[str, bytes]) -> str:
    """manifest.json's text for a checkpoint's files."""
    return json.dumps(
        {"format": 1, "files": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}, indent=2, sort_keys=True
    )


def is_complete(storage: Storage, rel: str) -> bool:
    return storage.is_file(f"{rel}/{MANIFEST_FILE}")


def verify_checkpoint(storage: Storage, rel: str) -> str | None:
    """None if the folder is complete and every file matches its sha256, else what is wrong."""
    try:
        read_checkpoint_files(storage, rel)
    except CheckpointError as exc:
        return str(exc)
    return None


def read_checkpoint_files(storage: Storage, rel: str) -> dict[str, bytes]:
    """Every file of a checkpoint, each checked against the manifest."""
    where = storage.uri(rel)
    if not is_complete(storage, rel):
        raise CheckpointError(f"checkpoint: no complete checkpoint at {where} (manifest.json missing)")
    try:
        manifest = json.loads(storage.read_text(f"{rel}/{MANIFEST_FILE}"))
        listed = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint: {where}/{MANIFEST_FILE} is corrupt") from None
    blobs = {}
    for fname, digest in listed.items():
        if not storage.is_file(f"{rel}/{fname}"):
            raise CheckpointError(f"checkpoint: {where}/{fname} is missing")
        data = storage.read_bytes(f"{rel}/{fname}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"checkpoint: {where}/{fname} does not match its sha256 (corrupt or truncated)")
        blobs[fname] = data
    return blobs
