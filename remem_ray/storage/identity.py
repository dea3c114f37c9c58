"""What an input held when a sweep started: an image folder's files, a weights file.

Teacher and student registry keys, and the node cache's fetched copies, name an input by where
it is (a path, an s3:// URI). One changed in place (images added to a folder, new weights
uploaded under the old name) was then trained from as stored before: a teacher of the old images
reused by every later sweep on the root, the node's old copy read on. The driver reads each
input's identity once as the sweep starts (`remem_ray/inputs.py`); the keys and the cache name
it beside the location, so changed inputs train anew and are fetched again.

- an image folder: the names and sizes of its image files (what torchvision's ImageFolder
  reads), the same for a local folder and for an s3:// copy of it;
- a weights file: its size and modification time (a new upload changes it, as a rewrite does).
"""

from __future__ import annotations

import hashlib

from remem_ray.storage.fs import Storage

# torchvision's IMG_EXTENSIONS (ImageFolder reads these, any case); tests hold the two equal
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def folder_identity(location: str, endpoint: str | None = None, region: str | None = None) -> str | None:
    """A fingerprint of the image files under a folder (path or s3:// URI): their names below
    it and sizes; None where there is no such folder or no image in it."""
    files = [(name, size) for name, size in Storage(location, endpoint, region).files() if _is_image(name)]
    if not files:
        return None
    digest = hashlib.sha256()
    for name, size in files:
        digest.update(f"{name}\t{size}\n".encode())
    return digest.hexdigest()[:16]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def file_identity(location: str, endpoint: str | None = None, region: str | None = None) -> str | None:
    """A weights file's size and modification time (path or s3:// URI); None where there is none."""
    parent, _, name = location.rstrip("/").rpartition("/")
    return Storage(parent or ".", endpoint, region).stamp(name)
