"""Which of Tune's saved states a resume restores: the newest driver's, whatever its clock's zone.

Each Tune driver names its saves by its start in its own local time (`experiment_state-<start>
.json`, `search_gen_state-<start>.json`, `searcher-state-<start>.pkl`...), and a restore, like
ExperimentAnalysis and `remem sweep status`, takes the greatest name. A sweep begun on a laptop
at UTC+8 and resumed on a cluster node in UTC within 8 hours of its start was restored from the
laptop's state (trials ran again, the searcher was set back), and so was every later look. What
each experiment state holds, its driver's start as a Unix time, orders the drivers; before a
restore, the resuming driver (holding the sweep's driver lease) moves aside the saves of any
older driver whose names sort after the newest one's.
"""

from __future__ import annotations

import json

from remem_ray.storage import Storage

STATE_PREFIX, STATE_SUFFIX = "experiment_state-", ".json"
# every name Tune 2.60 saves per driver and restores by the greatest (its CKPT_FILE_TMPLs)
SAVE_KINDS = (
    ("experiment_state-", ".json"),
    ("search_gen_state-", ".json"),
    ("searcher-state-", ".pkl"),
    ("basic-variant-state-", ".json"),
    ("callback-states-", ".pkl"),
)
SUPERSEDED = "superseded-"  # no Tune pattern matches a name starting so: kept, never read


def _sessions(experiment: Storage) -> list[str]:
    names = experiment.list_dir()
    return [
        n[len(STATE_PREFIX) : -len(STATE_SUFFIX)]
        for n in names
        if n.startswith(STATE_PREFIX) and n.endswith(STATE_SUFFIX)
    ]


def _started(experiment: Storage, session: str) -> float | None:
    """The driver's start (Unix time) its experiment state holds; None where it does not read."""
    try:
        return float(json.loads(experiment.read_text(f"{STATE_PREFIX}{session}{STATE_SUFFIX}"))["stats"]["start_time"])
    except (ValueError, KeyError, TypeError):
        return None


def name_newest_state_last(experiment: Storage) -> str | None:
    """Move aside the saves of drivers older than the newest that sort after it; a line saying so."""
    sessions = _sessions(experiment)
    if len(sessions) < 2:
        return None
    started = {session: _started(experiment, session) for session in sessions}
    known = [s for s in sessions if started[s] is not None]
    if not known:
        return None
    newest = max(known, key=lambda s: (started[s], s))
    moved = sorted(s for s in known if s > newest)  # one that does not read is not judged
    for session in moved:
        for prefix, suffix in SAVE_KINDS:
            name = f"{prefix}{session}{suffix}"
            if experiment.is_file(name):
                experiment.write_bytes(f"{SUPERSEDED}{name}", experiment.read_bytes(name))
                experiment.delete_file(name)
    if not moved:
        return None
    return (
        f"sweep: Tune's saves of an earlier driver ({', '.join(moved)}) sorted after the newest one's ({newest}: "
        f"the drivers' clocks were in different zones), so they were restored; moved aside as {SUPERSEDED}*"
    )
