"""What an input held when a sweep started: an image folder's files, a weights file.

Teacher and student registry keys, and the node cache's fetched copies, name an input by where
it is (a path, an s3:// URI). One changed in place (images added to a folder, new weights
uploaded under the old name) was then trained from as stored before: a teacher of the old images
reused by every later sweep on the root, the node's old copy read on. The driver reads each
input's identity once as the sweep starts (`remem_ray/inputs.py`); the keys and the cache name
it beside the location, so changed inputs train anew and are fetched again.

- an image folder: the names and sizes of its image files (what torchvision's ImageFolder
  reads), the same for a local folder and for an s3:// copy of it;
- a weights file: a local one's sha256, an s3:// object's size and time (an upload changes it).
"""

from __future__ import annotations

import hashlib

from remem_ray.errors import ResourceError
from remem_ray.storage.fs import Storage

# torchvision's IMG_EXTENSIONS (ImageFolder reads these, any case); tests hold the two equal
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")  # data/datasets.py's imagefolder: each read where present
HASH_CHUNK = 1 << 20


def folder_identity(location: str, endpoint: str | None = None, region: str | None = None) -> str | None:
    """A fingerprint of the images an image folder (path or s3:// URI) gives its runs: the names
    and sizes of the files torchvision's ImageFolder reads (images inside class folders, of the
    split folders where there are any), not their times (a copy keeps it). None where there is no
    such folder or no image in it. An image rewritten at the same size is not seen."""
    files = Storage(location, endpoint, region).files()
    roots = _split_roots(files)
    read = [(name, size) for name, size in files if _read_by_imagefolder(name, roots)]
    if not read:
        return None
    digest = hashlib.sha256()
    for name, size in read:
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()[:16]


def _split_roots(files: list[tuple[str, int]]) -> tuple[str, ...]:
    """The folders whose class folders are read: train/, val/, test/ where present, else the root
    (with no train/, the root is the training set and val/ or test/ read as well)."""
    tops = {name.split("/", 1)[0] for name, _ in files if "/" in name}
    present = tuple(f"{split}/" for split in SPLIT_FOLDERS if split in tops)
    return present if "train/" in present else ("", *present)


def _read_by_imagefolder(name: str, roots: tuple[str, ...]) -> bool:
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return False
    return any(name.startswith(root) and "/" in name[len(root) :] for root in roots)  # inside a class folder


def file_identity(location: str, endpoint: str | None = None, region: str | None = None) -> str | None:
    """A weights file's identity (path or s3:// URI); None where there is none. A local file: its
    sha256 (every copy of the same bytes alike: a node's, an rsync's); an s3:// object: its size
    and time (an upload changes it; reading the whole object at every start would not pay)."""
    parent, _, name = location.rstrip("/").rpartition("/")
    store = Storage(parent or ".", endpoint, region)
    if store.is_s3:
        return store.stamp(name)
    if not store.is_file(name):
        return None
    digest = hashlib.sha256()
    try:
        with open(store.path(name), "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ResourceError(f"cannot read {location}: {exc.strerror or exc}") from None
    return f"sha256:{digest.hexdigest()[:16]}"
