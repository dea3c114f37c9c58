"""Every name under <root>/teachers/<key>/, the teacher registry's tree (torch-free).

    <key>/lease/<generation>.json    who may train the key now (remem_ray.leases)
    <key>/sets/<version>.json        the pointer to the set in use; each version names the
                                     generation folder whose checkpoints readers use, and the
                                     trial (sweep/trial) that published that folder
    <key>/diverged.json              written once its training diverged (NaN or infinite loss):
                                     the key is not trained again until it is removed
    <key>/gen-<generation>/          what the holder of that lease generation wrote (targets/ aside):
        spec.json                      the spec and key it trained from
        epoch_<e>/                     its checkpoints (manifest last; unchanged once complete)
        history.json                   the whole curve, once finished
        resume/state.pt                its resume state, read by whoever trains the key next
        resume/adopted.pt              an earlier holder's state it continues from, until it has
                                       a state.pt of its own (with the checkpoints that one names)
        train-run/                     its Ray Train run, where the teacher trains in a run of its own
        targets/                       students' target caches of its checkpoints, written by any
                                       student once the set is published (named by content hash,
                                       each file written whole; one computing run at a time, by
                                       a lease beside each: remem_ray.train.target_cache)

A holder writes only into its own generation's folder and publishes it with one exclusive
create of the pointer's next version (remem_ray.sweep.registry): a holder whose lease passed on
can write nothing that a reader uses; the next holder reads its folder only to resume from its
state, which is written whole.

Keys trained by older versions keep their one set at <key>/epoch_<e>/ (or in the folder that
<key>/active.json names, after a retraining); with no pointer, that set is the one in use.
"""

from __future__ import annotations

import json

from remem_ray.storage import Storage

LEASE_DIR = "lease"
SETS_DIR = "sets"
SPEC_FILE = "spec.json"
HISTORY_FILE = "history.json"
RESUME_DIR = "resume"
STATE_FILE = "state.pt"  # a resume state's file, in resume/ or in a Train checkpoint
RESUME_STATE = f"{RESUME_DIR}/{STATE_FILE}"
# an earlier holder's state, copied by a new holder before it has copied that holder's checkpoints:
# not a state.pt, so no later holder takes this generation for one it can resume (resume_source)
ADOPTED_STATE_FILE = "adopted.pt"
TRAIN_RUN = "train-run"
TARGETS_DIR = "targets"
DIVERGED_FILE = "diverged.json"
_GENERATION_PREFIX = "gen-"
_LEGACY_ACTIVE_FILE = "active.json"


def generation_dir(generation: int) -> str:
    return f"{_GENERATION_PREFIX}{generation:08d}"


def version_file(version: int) -> str:
    return f"{version:08d}.json"


def _number(name: str, prefix: str = "", suffix: str = "") -> int | None:
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    digits = name[len(prefix) : len(name) - len(suffix)]
    return int(digits) if digits.isdigit() else None


class TeacherFolder:
    """One teacher key's folder in the registry."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def uri(self, *parts: str) -> str:
        return self.storage.uri(*parts)

    @property
    def lease(self) -> Storage:
        return self.storage.child(LEASE_DIR)

    @property
    def sets(self) -> Storage:
        return self.storage.child(SETS_DIR)

    def generation(self, generation: int) -> Storage:
        """Where the holder of that lease generation writes."""
        return self.storage.child(generation_dir(generation))

    def generations(self) -> list[int]:
        found = (_number(name, _GENERATION_PREFIX) for name in self.storage.list_dir())
        return sorted(g for g in found if g is not None)

    def versions(self) -> list[int]:
        found = (_number(name, suffix=".json") for name in self.sets.list_dir())
        return sorted(v for v in found if v is not None)

    def legacy_set(self) -> str:
        """Where an older version kept the set in use, relative to the key's folder: its root
        (""), or what active.json names."""
        if self.storage.is_file(_LEGACY_ACTIVE_FILE):
            return json.loads(self.storage.read_text(_LEGACY_ACTIVE_FILE))["folder"]
        return ""
