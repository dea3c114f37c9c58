"""Which of Tune's saves is the sweep's state: the newest driver's, whatever its clock's zone.

Each Tune driver names its saves by its start in its own local time (`experiment_state-<start>
.json`, `search_gen_state-<start>.json`, `searcher-state-<start>.pkl`...), and Tune, like a
plain ExperimentAnalysis, takes the greatest name. A sweep begun on a laptop at UTC+8 and resumed
on a cluster node in UTC within 8 hours of its start kept reading the laptop's saves: the node's
sort before them. What each experiment state holds, its driver's start as a Unix time, orders
the drivers instead:

- our readers (`sweep status`, the summary and report, the study's copy) read the newest
  driver's saves (`newest_save`);
- before a restore, the resuming driver (holding the sweep's driver lease) moves aside the
  saves of older drivers that sort after the newest (`name_newest_state_last`), in storage and
  in Tune's local staging folders on its node (which a restore reads, and syncs back up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from remem_ray.storage import Storage

STATE = ("experiment_state-", ".json")
# every name Tune 2.60 saves per driver and restores by the greatest (its CKPT_FILE_TMPLs); the
# experiment state last: a move cut short leaves its session still listed, and moved next time
SAVE_KINDS = (
    ("search_gen_state-", ".json"),
    ("searcher-state-", ".pkl"),
    ("basic-variant-state-", ".json"),
    ("callback-states-", ".pkl"),
    STATE,
)
SUPERSEDED = "superseded-"  # no Tune pattern matches a name starting so: kept, never read
SETTLE_TRIES, SETTLE_PAUSE_S = 3, 0.5  # looks at a file Tune may be rewriting in place

T = TypeVar("T")


def read_settled(read: Callable[[], T], half_written: type[Exception] | tuple[type[Exception], ...]) -> T:
    """read(), looked at again while it fails as a file caught half written does: Tune rewrites a
    local root's experiment state and searcher snapshot in place while the sweep runs. The last
    failure is raised."""
    for _ in range(SETTLE_TRIES - 1):
        try:
            return read()
        except half_written:
            time.sleep(SETTLE_PAUSE_S)
    return read()


def _sessions(names: list[str], kind: tuple[str, str] = STATE) -> list[str]:
    prefix, suffix = kind
    return [n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)]


def _started(experiment: Storage, session: str) -> float | None:
    """The driver's start (Unix time) its experiment state holds; None where it does not read
    (looked at again a few times: Tune copies its state over the old one while it runs)."""
    try:
        data = read_settled(lambda: json.loads(experiment.read_text(f"{STATE[0]}{session}{STATE[1]}")), ValueError)
        return float(data["stats"]["start_time"])
    except (ValueError, KeyError, TypeError):  # still half written, or not a Tune experiment state
        return None


def _starts(experiment: Storage, names: list[str]) -> dict[str, float]:
    started = {session: _started(experiment, session) for session in _sessions(names)}
    return {session: start for session, start in started.items() if start is not None}


def newest_save(experiment: Storage, kind: tuple[str, str] = STATE) -> str | None:
    """The name of the newest driver's save of `kind`; where no experiment state tells the
    drivers apart (one driver, or none readable), the greatest name, as Tune takes it."""
    names = experiment.list_dir()
    saves = _sessions(names, kind)
    if not saves:
        return None
    starts = _starts(experiment, names) if len(_sessions(names)) > 1 else {}
    dated = [s for s in saves if s in starts]
    newest = max(dated, key=lambda s: (starts[s], s)) if dated else max(saves)
    return f"{kind[0]}{newest}{kind[1]}"


def name_newest_state_last(experiment: Storage, staging_dirs: list[Path] | None = None) -> str | None:
    """Move aside the saves of drivers older than the newest that sort after it, in storage and in
    `staging_dirs` (Tune's local copies); a line saying so, or None."""
    names = experiment.list_dir()
    starts = _starts(experiment, names)
    if not starts:
        return None
    newest = max(starts, key=lambda s: (starts[s], s))
    listed = {s for kind in SAVE_KINDS for s in _sessions(names, kind)}
    # a session whose experiment state is gone (a move cut short) but not its other saves: older
    moved = sorted(s for s in listed if s > newest and (s in starts or s not in _sessions(names)))
    for session in moved:
        for prefix, suffix in SAVE_KINDS:
            name = f"{prefix}{session}{suffix}"
            for staging in staging_dirs or []:
                (staging / name).unlink(missing_ok=True)
            if experiment.is_file(name):
                experiment.write_bytes(f"{SUPERSEDED}{name}", experiment.read_bytes(name))
                experiment.delete_file(name)
    if not moved:
        return None
    return (
        f"sweep: Tune's saves of an earlier driver ({', '.join(moved)}) sorted after the newest one's ({newest}: "
        f"the drivers' clocks were in different zones), so Tune would restore them; moved aside as {SUPERSEDED}*"
    )


def staging_dirs(experiment_name: str) -> list[Path]:
    """Tune's local staging folders of this experiment under this node's Ray session (a restore on
    the node reuses the first run's, adds what it downloads, and uploads it all back)."""
    try:
        import ray

        node: Any = ray._private.worker._global_node  # noqa: SLF001 - no public way to the session folder
        session = Path(node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - no local node (Ray Client): nothing staged here
        return []
    return [p for p in (session / "artifacts").glob(f"*/{experiment_name}/driver_artifacts") if p.is_dir()]
