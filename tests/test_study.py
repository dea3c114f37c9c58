"""The sweep's study where Optuna's own tools read it (remem_ray/sweep/study.py)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from remem_ray.storage import Storage
from remem_ray.sweep.study import bring_up_to

POINT = {"x": FloatDistribution(0.0, 1.0)}


def _ids(url: str, name: str) -> tuple[int, list[int]]:
    storage = optuna.storages.get_storage(url)
    study_id = storage.get_study_id_from_name(name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    return study_id, [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in trials]


def test_a_study_in_the_users_optuna_storage_is_brought_up_to_date_in_place(tmp_path):
    """`sweep.optuna_storage` (an RDB that a dashboard reads): each copy adds new trials and updates
    running ones where they are. Before, the study was deleted and written again at every copy: a
    reader found it missing for a moment, and the notes written with optuna-dashboard went."""
    url = f"sqlite:///{tmp_path / 'users.db'}"
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("sweep", "s")
    study.tell(study.ask(POINT), 0.5)
    running = study.ask(POINT)
    running.report(0.2, 1)
    bring_up_to(study, url, "s")
    study_id, trial_ids = _ids(url, "s")
    # what optuna-dashboard writes as a user annotates the study and a trial (study system attrs:
    # a finished trial cannot change)
    storage = optuna.storages.get_storage(url)
    storage.set_study_system_attr(study_id, "dashboard:note", "the baseline is trial 0")
    storage.set_study_system_attr(study_id, f"dashboard:trial_note:{trial_ids[0]}", "the baseline")

    running.report(0.4, 2)
    study.tell(running, state=TrialState.PRUNED)
    study.tell(study.ask(POINT), 0.9)
    bring_up_to(study, url, "s")

    reader = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in reader.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.params for t in reader.trials] == [t.params for t in study.trials]
    assert reader.trials[1].intermediate_values == {1: 0.2, 2: 0.4} and reader.best_value == 0.9
    assert reader.user_attrs == {"sweep": "s"}
    new_study_id, new_trial_ids = _ids(url, "s")
    assert new_study_id == study_id and new_trial_ids[:2] == trial_ids  # a reader's ids hold
    storage = optuna.storages.get_storage(url)
    notes = storage.get_study_system_attrs(study_id)
    assert notes["dashboard:note"] == "the baseline is trial 0"
    assert notes[f"dashboard:trial_note:{trial_ids[0]}"] == "the baseline"


def test_a_stored_study_that_is_not_an_earlier_state_of_the_sweeps_is_replaced(tmp_path):
    """A study of that name from something else (another sweep once named so): replaced whole."""
    url = f"sqlite:///{tmp_path / 'users.db'}"
    other = optuna.create_study(direction="maximize")
    other.tell(other.ask(POINT), 0.1)
    other.tell(other.ask(POINT), 0.2)
    bring_up_to(other, url, "s")
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(POINT), 0.7)
    bring_up_to(study, url, "s")
    reader = optuna.load_study(study_name="s", storage=url)
    assert [(t.params, t.value) for t in reader.trials] == [(t.params, t.value) for t in study.trials]


def test_the_study_copy_is_made_once_per_snapshot_and_opens_in_optuna(tmp_path, monkeypatch):
    import pickle

    import optuna

    from remem_ray.config import SweepSpec
    from remem_ray.sweep import study as study_module
    from remem_ray.sweep.layout import SweepLayout

    spec = SweepSpec.model_validate({"name": "s", "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    export = study_module.StudyExport(spec, layout)
    assert export() is None  # before Tune saved a snapshot
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    layout.experiment.write_bytes("searcher-state-1.pkl", pickle.dumps({"study": study}))
    stores = []
    real_store = study_module._store
    monkeypatch.setattr(study_module, "_store", lambda *a: (stores.append(1), real_store(*a)))
    url = export()
    assert export() == url and len(stores) == 1  # the same snapshot: not copied again
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1
    study.tell(study.ask(), 0.7)
    layout.experiment.write_bytes("searcher-state-2.pkl", pickle.dumps({"study": study}))
    export()
    assert len(stores) == 2 and len(optuna.load_study(study_name="s", storage=url).trials) == 2


def test_the_dashboard_on_a_taken_port_is_one_line_before_any_address_is_printed(tmp_path, capsys):
    """Before, it printed the dashboard's address, then failed with an OSError traceback."""
    import socket

    from remem_ray.config import SweepSpec
    from remem_ray.errors import UserInputError
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.study import STUDY_FILE, serve_dashboard

    spec = SweepSpec.model_validate({"name": "s", "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    Path(layout.experiment.path()).mkdir(parents=True)
    bring_up_to(optuna.create_study(), f"sqlite:///{layout.experiment.path(STUDY_FILE)}", "s")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserInputError, match=rf"^--port: 127.0.0.1:{port} is taken .*pick another --port"):
            serve_dashboard(spec, layout, port)
    assert "Optuna dashboard" not in capsys.readouterr().out


def test_a_dashboard_left_open_during_a_sweep_sees_each_new_copy(tmp_path, monkeypatch):
    """The driver replaces optuna.db by renaming a new copy over it; the dashboard's storage kept
    its connection to the file it opened first, and never showed another trial."""
    import pickle

    import optuna_dashboard
    from optuna.storages import get_storage

    from remem_ray.config import SweepSpec
    from remem_ray.sweep import study as study_module
    from remem_ray.sweep.layout import SweepLayout

    spec = SweepSpec.model_validate({"name": "s", "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    export = study_module.StudyExport(spec, layout)
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    layout.experiment.write_bytes("searcher-state-1.pkl", pickle.dumps({"study": study}))
    export()
    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.append(get_storage(storage)))
    monkeypatch.setattr(study_module, "_check_port_free", lambda port: None)
    study_module.serve_dashboard(spec, layout, 8080)
    (reader,) = served  # as optuna-dashboard reads it
    study_id = reader.get_study_id_from_name("s")
    assert len(reader.get_all_trials(study_id)) == 1
    study.tell(study.ask(), 0.7)
    layout.experiment.write_bytes("searcher-state-2.pkl", pickle.dumps({"study": study}))
    export()
    assert len(reader.get_all_trials(reader.get_study_id_from_name("s"))) == 2


def test_a_queued_point_asked_between_copies_updates_the_users_study_in_place(tmp_path):
    """points_to_evaluate sit in the study as WAITING trials without params until asked: the
    next copy took the stored study for another one's, deleted and rebuilt it, and the notes and
    attributes written there went with it."""
    url = f"sqlite:///{tmp_path / 'users.db'}"
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.25})
    study.enqueue_trial({"x": 0.75})
    first = study.ask(POINT)
    bring_up_to(study, url, "s")
    study_id, _ = _ids(url, "s")
    storage = optuna.storages.get_storage(url)
    storage.set_study_system_attr(study_id, "dashboard:note", "kept")
    second = study.ask(POINT)
    study.tell(first, 0.5)
    second.report(0.3, 1)
    bring_up_to(study, url, "s")
    reader = optuna.load_study(study_name="s", storage=url)
    assert _ids(url, "s")[0] == study_id
    assert optuna.storages.get_storage(url).get_study_system_attrs(study_id)["dashboard:note"] == "kept"
    assert [t.params for t in reader.trials] == [{"x": 0.25}, {"x": 0.75}]
    assert [t.state for t in reader.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert reader.trials[1].intermediate_values == {1: 0.3}
