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
BEST_POINTER = "best.json"  # which best_epoch_<e>/ holds a student's best so far
LEGACY_BEST = "best"  # where older versions kept it, rewritten in place


class CheckpointError(ResourceError):
    """A checkpoint folder is missing, unfinished or corrupt."""


def checkpoint_name(epoch: int) -> str:
    """A teacher's checkpoint folder for one saved epoch."""
    return f"epoch_{epoch}"


_BEST_PREFIX = "best_epoch_"


def best_name(epoch: int) -> str:
    """A student's best checkpoint as of one epoch: written once, then pointed at."""
    return f"{_BEST_PREFIX}{epoch}"


def is_best_name(name: str) -> bool:
    return name.startswith(_BEST_PREFIX) and name[len(_BEST_PREFIX) :].isdigit()


def point_best(storage: Storage, epoch: int) -> str | None:
    """Point readers at best_epoch_<epoch> (one whole-object write); returns what it pointed at before."""
    before = storage.read_text(BEST_POINTER) if storage.is_file(BEST_POINTER) else None
    storage.write_text(BEST_POINTER, json.dumps({"epoch": epoch, "checkpoint": best_name(epoch)}))
    return None if before is None else json.loads(before)["checkpoint"]


def point_stored_best(storage: Storage, epoch: int, folder_uri: str) -> None:
    """Point readers of `storage` at best_epoch_<epoch> in another folder (a stored student's,
    which a replayed trial reports as its own); one whole-object write."""
    record = {"epoch": epoch, "checkpoint": best_name(epoch), "folder": folder_uri}
    storage.write_text(BEST_POINTER, json.dumps(record))


def _best_pointer(storage: Storage) -> dict | None:
    """The best pointer's record, or None if there is none. Read by `sweep status` while trials
    run: a restarted student removes its pointer as it begins, between a look and a read."""
    try:
        return json.loads(storage.read_text(BEST_POINTER))
    except ResourceError:
        if storage.is_file(BEST_POINTER):  # there, yet unreadable: storage's error stands
            raise
        return None


def best_checkpoint_name(storage: Storage) -> str | None:
    """The name (under `storage`) of a student's best checkpoint written there, or None if it has
    none yet (or its pointer names another folder's: see best_location)."""
    pointer = _best_pointer(storage)
    if pointer is not None:
        return None if pointer.get("folder") else str(pointer["checkpoint"])
    return LEGACY_BEST if is_complete(storage, LEGACY_BEST) else None


def best_location(storage: Storage) -> tuple[Storage, str] | None:
    """(folder, name) of a student's best checkpoint, following a pointer to another folder; None
    if it has none yet."""
    pointer = _best_pointer(storage)
    if pointer is not None:
        folder = pointer.get("folder")
        where = Storage(folder, storage.endpoint, storage.region) if folder else storage
        return where, str(pointer["checkpoint"])
    return (storage, LEGACY_BEST) if is_complete(storage, LEGACY_BEST) else None


def best_checkpoint(storage: Storage) -> str | None:
    """The URI of a student's best checkpoint under `storage` (or where its pointer says), or None."""
    location = best_location(storage)
    return None if location is None else location[0].uri(location[1])


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


def write_checkpoint_files(storage: Storage, rel: str, files: dict[str, bytes]) -> None:
    """Data first, manifest last: readers trust a folder only once its manifest exists."""
    if storage.is_file(f"{rel}/{MANIFEST_FILE}"):
        # Rewriting: drop the old manifest first so no reader trusts half-replaced data.
        # (One object delete; recursive folder deletes are asynchronous on some S3 servers.)
        storage.delete_file(f"{rel}/{MANIFEST_FILE}")
    for fname, data in files.items():
        storage.write_bytes(f"{rel}/{fname}", data)
    storage.write_text(f"{rel}/{MANIFEST_FILE}", manifest_for(files))


def copy_checkpoint(source: Storage, target: Storage, rel: str) -> None:
    """Copy a checkpoint, checked against its manifest; a complete one at the target is kept.
    Raises CheckpointError if the source is missing, unfinished or corrupt."""
    if not is_complete(target, rel):
        write_checkpoint_files(target, rel, read_checkpoint_files(source, rel))


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


def split_location(location: str, endpoint: str | None = None, region: str | None = None) -> tuple[Storage, str]:
    """A checkpoint folder given as a path or s3:// URI -> (storage of its parent, its name); a
    spec's checkpoints are read with its storage's endpoint and region."""
    parent, _, name = location.rstrip("/").rpartition("/")
    if not name:
        raise CheckpointError(f"checkpoint: not a folder location: {location!r}")
    return Storage(parent or ".", endpoint, region), name
