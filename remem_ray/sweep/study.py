"""The sweep's Optuna study where Optuna's own tools open it.

The live study stays in memory inside Tune's searcher, whose pickled snapshots (searcher-state-
*.pkl) roll back with the experiment on resume, so the study and Tune never disagree. What Optuna
tools read is a copy of the newest snapshot, made at each progress tick and at the end: by
default `optuna.db` (SQLite) in the sweep folder, replaced whole (uploaded there for s3:// roots),
or the study at the spec's `sweep.optuna_storage` URL, brought up to it in place; the study is
named after the sweep.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from remem_ray.config import SweepSpec
from remem_ray.errors import ResourceError
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.tune_adapter import study_from_searcher_state
from remem_ray.sweep.tune_state import newest_save, read_settled

STUDY_FILE = "optuna.db"


def newest_snapshot(layout: SweepLayout) -> bytes | None:
    """The newest driver's searcher-state-*.pkl in the sweep folder (sweep/tune_state.py), or None
    before the first."""
    name = newest_save(layout.experiment, ("searcher-state-", ".pkl"))
    return layout.experiment.read_bytes(name) if name else None


class _Unreadable(Exception):
    """A snapshot's bytes that did not unpickle (a truncated pickle fails in many ways)."""


def newest_study(layout: SweepLayout):
    """The Optuna study in Tune's newest snapshot, or None before the first; a reader (`remem
    sweep status`) that never finds it whole says so in one line."""

    def read():
        snapshot = newest_snapshot(layout)
        if snapshot is None:
            return None
        try:
            return study_from_searcher_state(snapshot)
        except Exception as exc:  # noqa: BLE001
            raise _Unreadable(f"{type(exc).__name__}: {exc}") from None

    try:
        return read_settled(read, _Unreadable)
    except _Unreadable as exc:
        raise ResourceError(
            f"storage.root: the searcher state in {layout.experiment.uri()} cannot be read: {exc}"
        ) from None


def study_url(spec: SweepSpec, layout: SweepLayout) -> str:
    """Where `optuna.load_study(study_name=spec.name, storage=...)` finds the study."""
    if spec.sweep.optuna_storage:
        return spec.sweep.optuna_storage
    return f"sqlite:///{layout.experiment.path(STUDY_FILE)}" if _is_local(layout) else layout.experiment.uri(STUDY_FILE)


class StudyExport:
    """Brings the stored study up to Tune's newest snapshot of it; called at each progress line
    and at the end, it copies a snapshot only once (Tune saves one every few trial events)."""

    def __init__(self, spec: SweepSpec, layout: SweepLayout) -> None:
        self.spec, self.layout = spec, layout
        self._copied: bytes | None = None  # digest of the snapshot stored last

    def __call__(self) -> str | None:
        """The storage URL, or None before Tune saved any snapshot."""
        snapshot = newest_snapshot(self.layout)
        if snapshot is None:
            return None
        digest = hashlib.sha256(snapshot).digest()
        if digest != self._copied:
            _store(study_from_searcher_state(snapshot), self.spec, self.layout)
            self._copied = digest  # only once stored: a failed copy is tried again
        return study_url(self.spec, self.layout)


def _store(study, spec: SweepSpec, layout: SweepLayout) -> None:
    if spec.sweep.optuna_storage:
        bring_up_to(study, spec.sweep.optuna_storage, spec.name)
        return
    with tempfile.TemporaryDirectory(prefix="remem-study-") as tmp:
        fresh = Path(tmp) / STUDY_FILE
        bring_up_to(study, f"sqlite:///{fresh}", spec.name)
        if _is_local(layout):  # readers never see a half-written database
            target = Path(layout.experiment.path(STUDY_FILE))
            staged = target.with_suffix(".db.tmp")
            staged.write_bytes(fresh.read_bytes())
            os.replace(staged, target)
        else:
            layout.experiment.write_bytes(STUDY_FILE, fresh.read_bytes())


def bring_up_to(study, url: str, name: str) -> None:
    """The study under `name` at `url` made what `study` is now, in place (public Optuna API):
    new trials added, running ones updated, finished ones left alone, so a reader (a dashboard)
    keeps its study and trial ids, never finds the study missing, and notes written there stay.
    A stored study that is not an earlier state of this one (a study of another sweep by that
    name, say) is replaced whole."""
    import optuna

    storage = optuna.storages.get_storage(url)
    try:
        try:
            target = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            target = None
        trials = study.get_trials(deepcopy=False)
        if target is not None and (
            target.directions != study.directions or not _earlier_state(target.get_trials(deepcopy=False), trials)
        ):
            optuna.delete_study(study_name=name, storage=storage)
            target = None
        if target is None:
            target = optuna.create_study(storage=storage, study_name=name, directions=study.directions)
        for key, value in study.user_attrs.items():
            if target.user_attrs.get(key, _MISSING) != value:
                target.set_user_attr(key, value)
        stored = {t.number: t for t in target.get_trials(deepcopy=False)}
        study_id = storage.get_study_id_from_name(name)
        for trial in trials:  # in number order: an added trial takes the next number, its own
            mine = stored.get(trial.number)
            if mine is None:
                target.add_trial(trial)
            elif not mine.state.is_finished():
                _update(storage, storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), mine, trial)
    finally:
        if hasattr(storage, "remove_session"):
            storage.remove_session()  # let go of the SQLite file before it is moved or uploaded


_MISSING = object()


def _earlier_state(stored: list, trials: list) -> bool:
    """Whether `stored` could be an earlier copy of `trials`: as many or fewer, each at its number
    with the same point, and each finished one finished alike."""
    if len(stored) > len(trials):
        return False
    return all(
        mine.number == trial.number
        and (mine.params == trial.params or _queued(mine))
        and (not mine.state.is_finished() or (mine.state == trial.state and mine.values == trial.values))
        for mine, trial in zip(stored, trials, strict=False)
    )


def _queued(trial) -> bool:
    """A point queued (points_to_evaluate, a free point) and not asked yet when copied: WAITING,
    without params until it is asked. Taken for another study, it had the stored study deleted
    and rebuilt, its readers' notes with it, at the copy after each queued point started."""
    from optuna.trial import TrialState

    return trial.state == TrialState.WAITING and not trial.params


def _update(storage, trial_id: int, mine, trial) -> None:
    """A running (or queued) trial's stored copy brought up to `trial`; its state last (a finished
    trial is immutable in Optuna's storages)."""
    for name, value in trial.params.items():  # a queued point's, once asked
        if name not in mine.params:
            distribution = trial.distributions[name]
            storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
    for step, value in trial.intermediate_values.items():
        if mine.intermediate_values.get(step) != value:
            storage.set_trial_intermediate_value(trial_id, step, value)
    for key, value in trial.user_attrs.items():
        if mine.user_attrs.get(key, _MISSING) != value:
            storage.set_trial_user_attr(trial_id, key, value)
    for key, value in trial.system_attrs.items():
        if mine.system_attrs.get(key, _MISSING) != value:
            storage.set_trial_system_attr(trial_id, key, value)
    if trial.state != mine.state:
        storage.set_trial_state_values(trial_id, trial.state, trial.values)


def _is_local(layout: SweepLayout) -> bool:
    return not layout.experiment.uri().startswith("s3://")


def serve_dashboard(spec: SweepSpec, layout: SweepLayout, port: int) -> None:
    """optuna-dashboard on 127.0.0.1:`port` over the stored study (an s3:// copy is fetched first)."""
    from remem_ray.errors import UserInputError

    try:
        import optuna_dashboard
    except ImportError:
        raise UserInputError(
            "sweep dashboard: optuna-dashboard is not installed; pip install 'remem-ray[dashboard]'"
        ) from None
    url = study_url(spec, layout)
    if not spec.sweep.optuna_storage:
        if not layout.experiment.is_file(STUDY_FILE):
            raise UserInputError(f"sweep: no Optuna study stored yet at {layout.experiment.uri(STUDY_FILE)}")
        if not _is_local(layout):
            local = Path(tempfile.mkdtemp(prefix="remem-study-")) / STUDY_FILE
            local.write_bytes(layout.experiment.read_bytes(STUDY_FILE))
            url = f"sqlite:///{local}"
    _check_port_free(port)
    print(f"Optuna dashboard of sweep {spec.name!r}: http://127.0.0.1:{port}  (Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(dashboard_storage(url), host="127.0.0.1", port=port)


def dashboard_storage(url: str):
    """What the dashboard reads: a sqlite copy through a new connection each request. The driver
    replaces the copy by renaming a new file over it, and a kept connection read the file it had
    opened: a dashboard left open during a sweep never saw a new trial. Another database (the
    user's `optuna_storage`) is updated in place and served as it is."""
    if not url.startswith("sqlite:///"):
        return url
    from optuna.storages import RDBStorage
    from sqlalchemy.pool import NullPool

    return RDBStorage(url, engine_kwargs={"poolclass": NullPool})


def _check_port_free(port: int) -> None:
    """Before the dashboard's address is printed: its server failed on a taken port with an
    OSError traceback, after the line that said where it was."""
    import socket

    from remem_ray.errors import UserInputError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no refusal
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UserInputError(f"--port: 127.0.0.1:{port} is taken ({exc.strerror}); pick another --port") from None
