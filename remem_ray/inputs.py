"""A run's inputs as they are when it starts (a sweep's driver, an in-process verb): identities
for its keys and the node's fetched copies (storage/identity.py says why)."""

from __future__ import annotations

from typing import TypeVar

from remem_ray.config import RunSpec, weights_kind
from remem_ray.errors import ResourceError
from remem_ray.storage.identity import file_identity, folder_identity

SpecT = TypeVar("SpecT", bound=RunSpec)


def with_input_identities(spec: SpecT) -> tuple[SpecT, list[str]]:
    """The spec with `data.root_identity` (an imagefolder's) and each role's `weights_identity`
    (a weights file's, local or s3://) read now, any value it came with replaced; and a line for
    each input this machine could not read, whose identity stays None (keyed by its location
    alone, e.g. a path only a cluster's nodes hold)."""
    where = (spec.storage.endpoint, spec.storage.region)
    unread: list[str] = []

    def read(field: str, identify, location: str) -> str | None:
        try:
            found = identify(location, *where)
        except ResourceError as exc:
            found, reason = None, str(exc)
        else:
            reason = f"nothing at {location} from this machine"
        if found is None:
            unread.append(
                f"{field}: {reason}; its teachers and students are known by its location alone "
                f"(changed in place, it would not be trained from anew)"
            )
        return found

    data = spec.data
    root = read("data.root", folder_identity, data.root) if data.name == "imagefolder" and data.root else None
    update: dict = {"data": data.model_copy(update={"root_identity": root})}
    for role in ("teacher", "student"):
        section = getattr(spec, role)
        weights = section.weights
        identity = read(f"{role}.weights", file_identity, weights) if weights_kind(weights) in ("s3", "file") else None
        update[role] = section.model_copy(update={"weights_identity": identity})
    return spec.model_copy(update=update), unread
