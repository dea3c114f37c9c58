"""A run's inputs as they are when it starts (a sweep's driver, an in-process verb): identities
for its keys and the node's fetched copies (storage/identity.py says why)."""

from __future__ import annotations

from typing import TypeVar

from remem_ray.config import RunSpec, weights_kind
from remem_ray.errors import ResourceError, UserInputError
from remem_ray.storage.identity import file_identity, folder_identity

SpecT = TypeVar("SpecT", bound=RunSpec)


def identities(spec: RunSpec) -> dict[str, str | None]:
    """The identities a spec carries, by the field of the input each is of."""
    return {
        "data.root": spec.data.root_identity,
        "teacher.weights": spec.teacher.weights_identity,
        "student.weights": spec.student.weights_identity,
    }


def with_identities(spec: SpecT, ids: dict[str, str | None]) -> SpecT:
    update = {
        "data": spec.data.model_copy(update={"root_identity": ids.get("data.root")}),
        **{
            role: getattr(spec, role).model_copy(update={"weights_identity": ids.get(f"{role}.weights")})
            for role in ("teacher", "student")
        },
    }
    return spec.model_copy(update=update)


def with_input_identities(spec: SpecT, roles: tuple[str, ...] = ("teacher", "student")) -> tuple[SpecT, list[str]]:
    """The spec with `data.root_identity` (an imagefolder's) and each role's `weights_identity`
    (a weights file's, local or s3://) read now, any value it came with replaced; and a line for
    each input this machine could not read, whose identity stays None (keyed by its location
    alone, e.g. a path only a cluster's nodes hold). `roles`: those whose weights are loaded
    (`remem distill` builds no teacher from its weights)."""
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
    ids = {
        "data.root": read("data.root", folder_identity, data.root) if data.name == "imagefolder" and data.root else None
    }
    for role in roles:
        weights = getattr(spec, role).weights
        ids[f"{role}.weights"] = (
            read(f"{role}.weights", file_identity, weights) if weights_kind(weights) in ("s3", "file") else None
        )
    return with_identities(spec, ids), unread


def as_begun(spec: SpecT, begun: dict[str, str | None] | None) -> tuple[SpecT, list[str]]:
    """A resumed sweep's spec: the identities it began with (its trials' keys, its searcher's),
    each checked against what its input holds now. A changed input is refused (UserInputError):
    trained on under the old keys, or under new ones beside finished trials of the old content,
    the sweep would mix the two, and a restarted trial's student would go on from a teacher of the
    old content. A sweep begun before identities (`begun` None) stays keyed by location."""
    if begun is None:
        return spec, []
    now, unread = with_input_identities(spec)
    locations = {
        "data.root": spec.data.root,
        "teacher.weights": spec.teacher.weights,
        "student.weights": spec.student.weights,
    }
    for field, current in identities(now).items():
        first = begun.get(field)
        if first is not None and current is not None and current != first:
            raise UserInputError(
                f"{field}: {locations[field]} changed since the sweep began (its trials are keyed by what it "
                f"held then): start a new sweep to train from it (`remem sweep run SPEC --name NEW`), or put back "
                f"what it held to resume this one"
            )
    kept = [line for line in unread if begun.get(line.split(":", 1)[0]) is None]  # the others: as begun
    return with_identities(spec, begun), kept
