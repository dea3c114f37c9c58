"""A run's inputs as they are when it starts (a sweep's driver, an in-process verb): identities
for its keys and the node's fetched copies (storage/identity.py says why)."""

from __future__ import annotations

from typing import TypeVar

from remem_ray.config import RunSpec, weights_kind
from remem_ray.errors import ResourceError, UserInputError
from remem_ray.storage.identity import file_identity, folder_identity

SpecT = TypeVar("SpecT", bound=RunSpec)

# each input with an identity: its field, as (spec section, location field, identity field)
INPUTS = {
    "data.root": ("data", "root", "root_identity"),
    "teacher.weights": ("teacher", "weights", "weights_identity"),
    "student.weights": ("student", "weights", "weights_identity"),
}


def identities(spec: RunSpec) -> dict[str, str | None]:
    """The identities a spec carries, by the field of the input each is of."""
    return {field: getattr(getattr(spec, section), ident) for field, (section, _, ident) in INPUTS.items()}


def with_identities(spec: SpecT, ids: dict[str, str | None]) -> SpecT:
    update = {
        section: getattr(spec, section).model_copy(update={ident: ids.get(field)})
        for field, (section, _, ident) in INPUTS.items()
    }
    return spec.model_copy(update=update)


def _location(spec: RunSpec, field: str) -> str | None:
    section, location, _ = INPUTS[field]
    return getattr(getattr(spec, section), location)


def _read_identities(spec: RunSpec, roles: tuple[str, ...]) -> tuple[dict[str, str | None], dict[str, str]]:
    """(each input's identity read now, None where there is nothing to identify or it cannot be
    read; a line for each input this machine could not read, by its field)."""
    where = (spec.storage.endpoint, spec.storage.region)
    fields = ["data.root"] if spec.data.name == "imagefolder" and spec.data.root else []
    fields += [f"{role}.weights" for role in roles if weights_kind(getattr(spec, role).weights) in ("s3", "file")]
    ids: dict[str, str | None] = {}
    unread: dict[str, str] = {}
    for field in fields:
        location = _location(spec, field)
        assert location is not None  # fields with a location only
        identify = folder_identity if field == "data.root" else file_identity
        try:
            ids[field] = identify(location, *where)
        except ResourceError as exc:
            ids[field], reason = None, str(exc)
        else:
            reason = f"nothing at {location} from this machine"
        if ids[field] is None:
            unread[field] = (
                f"{field}: {reason}; its teachers and students are known by its location alone "
                f"(changed in place, it would not be trained from anew)"
            )
    return ids, unread


def with_input_identities(spec: SpecT, roles: tuple[str, ...] = ("teacher", "student")) -> tuple[SpecT, list[str]]:
    """The spec with `data.root_identity` (an imagefolder's) and each role's `weights_identity`
    (a weights file's, local or s3://) read now, any value it came with replaced; and a line for
    each input this machine could not read, whose identity stays None (keyed by its location
    alone, e.g. a path only a cluster's nodes hold). `roles`: those whose weights are loaded
    (`remem distill` builds no teacher from its weights)."""
    ids, unread = _read_identities(spec, roles)
    return with_identities(spec, ids), list(unread.values())


def as_begun(spec: SpecT, begun: dict[str, str | None] | None) -> tuple[SpecT, list[str]]:
    """A resumed sweep's spec: the identities it began with (its trials' keys, its searcher's),
    each checked against what its input holds now. A changed input is refused (UserInputError):
    trained on under the old keys, or under new ones beside finished trials of the old content,
    the sweep would mix the two, and a restarted trial's student would go on from a teacher of the
    old content. A sweep begun before identities (`begun` None) stays keyed by location."""
    if begun is None:
        return spec, []
    now, unread = _read_identities(spec, ("teacher", "student"))
    for field, current in now.items():
        first = begun.get(field)
        if first is not None and current is not None and current != first:
            raise UserInputError(
                f"{field}: {_location(spec, field)} changed since the sweep began (its trials are keyed by what it "
                f"held then): start a new sweep to train from it (`remem sweep run SPEC --name NEW`), or put back "
                f"what it held to resume this one"
            )
    kept = [line for field, line in unread.items() if begun.get(field) is None]  # the others: as begun
    return with_identities(spec, begun), kept
