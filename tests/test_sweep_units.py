"""Sweep logic without a cluster: search space, pruning of ASHA-stopped trials, bad specs."""

import json
import pickle

import optuna
import pytest
import yaml
from helpers.sweeps import SMOKE

from remem_ray.cli import main
from remem_ray.config import SweepSpec, load_sweep_spec
from remem_ray.contract import METRIC, stopped_early
from remem_ray.errors import ResourceError
from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.search import TIME_ATTR, DefineByRunSpace, build_scheduler
from remem_ray.sweep.tune_adapter import budget_aware_optuna_search


def _spec(**sweep) -> SweepSpec:
    raw = {
        "teacher": {"epochs": 4, "checkpoint_epochs": [2, 4]},
        "student": {"epochs": 3},
        "sweep": {
            "search": {
                "rho": {"low": 0.01, "high": 0.5, "log": True},
                "alpha": {"values": [0.8, 0.9]},
                "kd_temperature": {"low": 1.0, "high": 8.0},
            },
            **sweep,
        },
    }
    return SweepSpec.model_validate(raw)


def test_define_by_run_space_samples_within_the_spec_and_is_picklable():
    import pickle

    space = pickle.loads(pickle.dumps(DefineByRunSpace(_spec())))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        space(trial)
        p = trial.params
        assert 0.01 <= p["rho"] <= 0.5 and p["alpha"] in (0.8, 0.9) and p["teacher_epoch"] in (2, 4)
        assert 1.0 <= p["kd_temperature"] <= 8.0
        study.tell(trial, 0.5)


def test_run_spec_of_a_trial_applies_its_parameters():
    run = _spec().run_spec({"rho": 0.2, "alpha": 0.8, "teacher_epoch": 2.0, "kd_temperature": 2.0})
    assert (run.teacher.rho, run.teacher.alpha, run.student.teacher_epoch, run.student.kd.temperature) == (
        0.2,
        0.8,
        2,
        2.0,
    )


def _searcher(spec):
    return budget_aware_optuna_search(
        DefineByRunSpace(spec), METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early
    )


def test_asha_stopped_trials_are_pruned_not_complete():
    searcher = _searcher(_spec())
    for tid in ("full", "stopped", "failed"):
        assert searcher.suggest(tid) is not None
    for epoch in (1, 2, 3):
        searcher.on_trial_result(
            "full", {METRIC: 0.5 + epoch / 10, "epoch": epoch, "epochs": 3, "training_iteration": epoch}
        )
    # Tune never hands the stopping result to on_trial_result: only to on_trial_complete
    searcher.on_trial_complete("full", {METRIC: 0.8, "epoch": 3, "epochs": 3})
    searcher.on_trial_complete("stopped", {METRIC: 0.9, "epoch": 1, "epochs": 3, "training_iteration": 1})
    searcher.on_trial_complete("failed", None, error=True)
    states = [t.state.name for t in searcher.study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert searcher.study.best_value == 0.8  # the partial 0.9 never counts as a finished score
    assert searcher.study.trials[1].intermediate_values == {1: 0.9}


def test_stopped_early_reads_the_epoch_budget():
    assert stopped_early({"epoch": 1, "epochs": 3})
    assert not stopped_early({"epoch": 3, "epochs": 3})
    assert not stopped_early(None) and not stopped_early({})


def test_asha_rungs_are_student_epochs():
    scheduler = build_scheduler(_spec(asha={"grace_period": 5, "reduction_factor": 2}))
    assert scheduler._max_t == 3  # capped at the student's epochs
    assert type(build_scheduler(_spec(asha={"enabled": False}))).__name__ == "FIFOScheduler"


def _stop_epoch(scheduler, retried_after: int | None) -> int | None:
    """The student epoch at which ASHA stops trial X, given recorded results of two rivals; X's
    Train run optionally retried after epoch `retried_after` (Tune's iteration restarts at 1)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    rivals = [Trial("__fake", config={}, stub=True) for _ in range(2)]
    x = Trial("__fake", config={}, stub=True)
    for trial in (*rivals, x):
        scheduler.on_trial_add(None, trial)
    for trial, scores in zip(rivals, ([0.1, 0.9, 0.9, 0.9], [0.2, 0.95, 0.95, 0.95])):
        for epoch, score in enumerate(scores, 1):
            scheduler.on_trial_result(
                None, trial, {METRIC: score, "epoch": epoch, "epochs": 8, "training_iteration": epoch}
            )
    iteration = 0
    for epoch, score in enumerate([0.5, 0.5, 0.5, 0.5, 0.5], 1):
        iteration = 1 if epoch - 1 == retried_after else iteration + 1
        decision = scheduler.on_trial_result(
            None, x, {METRIC: score, "epoch": epoch, "epochs": 8, "training_iteration": iteration}
        )
        if decision == TrialScheduler.STOP:
            return epoch
    return None


def test_a_retried_student_is_stopped_at_the_same_rung_as_one_never_retried():
    """Budgets count student epochs, not Tune iterations."""
    spec = _spec(asha={"grace_period": 1, "reduction_factor": 2})
    spec = spec.model_copy(update={"student": spec.student.model_copy(update={"epochs": 8})})
    never = _stop_epoch(build_scheduler(spec), retried_after=None)
    assert never == 2  # passes rung 1 (0.5 beats 0.1 and 0.2), falls at rung 2 (0.9, 0.95)
    assert _stop_epoch(build_scheduler(spec), retried_after=1) == never


def test_optuna_steps_are_student_epochs_across_a_retry():
    searcher = _searcher(_spec())
    searcher.suggest("t")
    for epoch, iteration in ((1, 1), (2, 2), (3, 1)):  # retried after epoch 2
        searcher.on_trial_result(
            "t", {METRIC: epoch / 10, "epoch": epoch, "epochs": 3, "training_iteration": iteration}
        )
    assert searcher.study.trials[0].intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3}


def test_a_sweep_enqueues_only_the_points_it_will_run():
    """Points beyond num_samples are never run; enqueued, they stayed WAITING in the stored study."""
    from remem_ray.sweep.search import build_searcher

    points = [{"alpha": a} for a in (0.8, 0.9, 0.8)]
    searcher = build_searcher(_spec(num_samples=2, points_to_evaluate=points))
    searcher.suggest("a")
    searcher.suggest("b")
    assert [(t.state.name, t.params.get("alpha")) for t in searcher.study.trials] == [
        ("RUNNING", 0.8),
        ("RUNNING", 0.9),
    ]
    assert len(build_searcher(_spec(num_samples=4, points_to_evaluate=points)).study.trials) == 3


BAD_SWEEPS = [
    ("num-samples-zero", {"sweep": {"num_samples": 0}}, "sweep.num_samples"),
    ("num-samples-over-ceiling", {"sweep": {"num_samples": 10**6}}, "sweep.num_samples"),
    ("concurrency-zero", {"sweep": {"max_concurrent_trials": 0}}, "sweep.max_concurrent_trials"),
    ("unknown-sweep-key", {"sweep": {"trials": 3}}, "sweep.trials: unknown key"),
    ("alpha-zero-in-space", {"sweep": {"search": {"alpha": {"values": [0.0, 0.9]}}}}, "alpha"),
    ("negative-rho-in-space", {"sweep": {"search": {"rho": {"values": [-0.1]}}}}, "rho"),
    (
        "range-and-values",
        {"sweep": {"search": {"rho": {"values": [0.1], "low": 0.0, "high": 1.0}}}},
        "sweep.search.rho",
    ),
    ("log-range-from-zero", {"sweep": {"search": {"rho": {"low": 0.0, "high": 0.5, "log": True}}}}, "sweep.search.rho"),
    ("teacher-epoch-not-saved", {"sweep": {"search": {"teacher_epoch": [3]}}}, "sweep.search.teacher_epoch"),
    ("point-outside-space", {"sweep": {"points_to_evaluate": [{"rho": 0.7}]}}, "points_to_evaluate.0.rho"),
    ("point-unknown-param", {"sweep": {"points_to_evaluate": [{"beta": 1}]}}, "points_to_evaluate.0"),
    ("asha-reduction-one", {"sweep": {"asha": {"reduction_factor": 1}}}, "sweep.asha.reduction_factor"),
    (
        "negative-gpus",
        {"sweep": {"resources": {"student": {"gpus_per_worker": -1}}}},
        "sweep.resources.student.gpus_per_worker",
    ),
    (
        "reweight-search-on-cnn",
        {"teacher": {"model": "resnet10t", "alpha": 1.0}, "sweep": {"search": {"alpha": {"values": [0.9]}}}},
        "sweep.search.alpha: MLP reweighting",
    ),
]


@pytest.mark.parametrize("case, patch, expected", BAD_SWEEPS, ids=[c[0] for c in BAD_SWEEPS])
def test_bad_sweep_spec_exits_2_before_ray_starts(case, patch, expected, in_tmp, capsys):
    import ray

    raw = {"teacher": {"epochs": 4, "checkpoint_epochs": [2, 4]}, "student": {"epochs": 2}}
    for section, values in patch.items():
        raw.setdefault(section, {}).update(values)
    (in_tmp / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["sweep", "run", "s.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: ") and err.count("\n") == 1 and expected in err, err
    assert not ray.is_initialized()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["s.yaml"]


def test_existing_sweep_name_refused_before_ray_starts_naming_a_resume_command_that_finds_it(
    in_tmp, capsys, monkeypatch
):
    """The command named works as given, from anywhere: it named the sweep by name alone, which
    `resume` looks for under ./remem-results, not under the --storage root the run was given."""
    import ray

    from remem_ray.sweep import locate_sweep

    (in_tmp / "s.yaml").write_text(yaml.safe_dump({"name": "taken"}))
    root = in_tmp / "elsewhere"
    folder = root / "sweeps" / "taken"
    folder.mkdir(parents=True)
    spec = SweepSpec(name="taken", storage={"root": str(root)})
    (folder / "sweep_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    (folder / "tuner.pkl").write_bytes(b"Tune's")  # a Tune experiment: something to resume
    assert main(["sweep", "run", "s.yaml", "--storage", str(root)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err
    command = err.split("resume it with `", 1)[1].split("`", 1)[0].split()
    assert command[:3] == ["remem", "sweep", "resume"]
    (in_tmp / "other").mkdir()
    monkeypatch.chdir(in_tmp / "other")
    assert locate_sweep(command[3]).name == "taken"
    assert not ray.is_initialized()


def test_resume_of_unknown_sweep_and_foreign_root(in_tmp, capsys):
    assert main(["sweep", "resume", "nothing-here"]) == 2
    assert "no sweep at" in capsys.readouterr().err
    # a sweep folder copied away from the root its spec names is refused (restore unpickles state)
    spec = SweepSpec(name="moved", storage={"root": str(in_tmp / "original")})
    moved = in_tmp / "elsewhere" / "sweeps" / "moved"
    moved.mkdir(parents=True)
    (moved / "sweep_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["sweep", "resume", str(moved)]) == 2
    assert "not under its configured storage root" in capsys.readouterr().err


def test_unreachable_s3_storage_exits_2_before_ray(in_tmp, capsys):
    import ray

    (in_tmp / "s.yaml").write_text(
        yaml.safe_dump({"storage": {"root": "s3://bucket/x", "endpoint": "http://127.0.0.1:9"}})
    )
    assert main(["sweep", "run", "s.yaml"]) == 2
    assert "storage: cannot" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_repository_sweep_specs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")):
        spec = load_sweep_spec(path)
        assert spec.sweep.num_samples >= 1


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sweep", "run", "SPEC", "--address", "127.0.0.1:9"], "--address: cannot reach Ray at 127.0.0.1:9"),
        (["sweep", "run", "SPEC", "--address", "not an address"], "--address: expected HOST:PORT"),
        (["sweep", "submit", "SPEC", "--address", "head:8265"], "--address: expected the Ray dashboard"),
        (
            ["sweep", "submit", "SPEC", "--address", "http://127.0.0.1:9", "--storage", "/shared/results"],
            "--address: cannot reach the Ray dashboard",
        ),
        (["sweep", "logs", "raysubmit_1", "--address", "http://127.0.0.1:9"], "--address: cannot reach"),
        (["sweep", "stop", "raysubmit_1", "--address", "ftp://x"], "--address: expected the Ray dashboard"),
    ],
    ids=["run-dead", "run-malformed", "submit-no-scheme", "submit-dead", "logs-dead", "stop-malformed"],
)
def test_bad_or_unreachable_address_exits_2_quickly(argv, expected, in_tmp, capsys, connect_timeouts):
    import ray

    (in_tmp / "s.yaml").write_text(yaml.safe_dump({"name": "addr"}))
    assert main([a if a != "SPEC" else "s.yaml" for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: ") and err.count("\n") == 1 and expected in err, err
    # quick by design: at most one connect, bounded, and never ray.init's minutes of retries
    assert len(connect_timeouts) <= 1 and all(t is not None and t <= 5 for t in connect_timeouts)
    assert not ray.is_initialized()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["s.yaml"]


def test_concurrency_defaults_from_the_gpu_budget():
    gpu = {"teacher": {"num_workers": 4, "gpus_per_worker": 1}, "student": {"gpus_per_worker": 1}}
    spec = SweepSpec.model_validate({"sweep": {"resources": {**gpu, "gpu_budget": 16}}})
    assert spec.max_concurrent_trials() == 4  # a trial peaks at 4 GPUs while its teacher trains
    spec = SweepSpec.model_validate({"sweep": {"resources": {**gpu, "gpu_budget": 16}, "max_concurrent_trials": 3}})
    assert spec.max_concurrent_trials() == 3
    assert SweepSpec().max_concurrent_trials() == 2
    res = SweepSpec.model_validate({"sweep": {"resources": {"driver_resource": "remem_driver"}}}).sweep.resources
    assert res.trial_resources() == {"cpu": 0.0, "remem_driver": 0.001}  # a head with no CPUs can run it


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"name": "abc\n"}, "name"),
        ({"storage": {"root": "s3://b/p", "endpoint": "http://127.0.0.1:9\n"}}, "storage.endpoint"),
        ({"storage": {"root": "s3://b/p", "endpoint": "http://AKIAX:secret@127.0.0.1:9"}}, "storage.endpoint"),
        ({"sweep": {"search": {"student_lr": {"values": [100.0]}}}}, "student_lr"),
        ({"sweep": {"search": {"kd_temperature": {"low": 1.0, "high": 500.0}}}}, "kd_temperature"),
    ],
    ids=["newline-name", "newline-endpoint", "credentials-in-endpoint", "student-lr-too-big", "temperature-too-big"],
)
def test_more_bad_sweep_specs(patch, expected):
    from remem_ray.config import parse_spec
    from remem_ray.errors import SpecError

    with pytest.raises(SpecError, match=expected) as err:
        parse_spec(SweepSpec, patch)
    assert "AKIAX" not in str(err.value) and "secret" not in str(err.value)


def test_locate_sweep_with_an_invalid_stored_spec_is_a_user_error(in_tmp, capsys):
    folder = in_tmp / "remem-results" / "sweeps" / "broken"
    folder.mkdir(parents=True)
    (folder / "sweep_spec.json").write_text(json.dumps({"name": "broken", "teacher": {"rho": -1}}))
    assert main(["sweep", "status", "broken"]) == 2
    assert "teacher.rho" in capsys.readouterr().err
    (folder / "sweep_spec.json").write_text("{not json")
    assert main(["sweep", "status", "broken"]) == 2
    assert "is not a sweep spec" in capsys.readouterr().err


def test_an_errored_trial_is_never_the_best_student(tmp_path, monkeypatch):
    """A trial that broke off at epoch 3 of 8 keeps its score in the table, not as best."""
    from types import SimpleNamespace

    from remem_ray.storage import Storage
    from remem_ray.sweep import results
    from remem_ray.sweep.layout import SweepLayout

    def trial(tid, status, val, epoch):
        return SimpleNamespace(
            trial_id=tid,
            status=status,
            config={"rho": 0.1, "alpha": 0.9, "teacher_epoch": 4},
            last_result={METRIC: val, "best_test_acc": val, "epoch": epoch, "epochs": 8},
        )

    trials = [trial("a", "TERMINATED", 0.80, 8), trial("b", "ERROR", 0.90, 3), trial("c", "TERMINATED", 0.70, 2)]
    monkeypatch.setattr(results, "load_trials", lambda layout: trials)
    spec = SweepSpec.model_validate({"name": "s", "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    error = "Failure # 1\nremem_ray.errors.TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan)\n"
    layout.trial_folder("b").write_text("error.txt", error)  # Tune's, as it writes it
    summary = results.summarize(spec, layout)
    assert summary.best.trial_id == "a"
    assert [r.state for r in summary.trials] == ["TERMINATED", "ERROR", "TERMINATED"]
    assert [r.failure for r in summary.trials] == [
        None,
        "TrainingDivergedError: teacher diverged in epoch 2 (val_loss nan)",
        None,
    ]
    # students distilled: those finished (or stopped by ASHA), not the part one that failed
    # distilled, nor one still distilling (`sweep status` mid-sweep counted both)
    assert summary.students_distilled == 2
    trials.append(trial("d", "RUNNING", 0.60, 1))
    assert results.summarize(spec, layout).students_distilled == 2
    trials[0].status = "ERROR"
    assert results.summarize(spec, SweepLayout(Storage(str(tmp_path)), "s")).best.trial_id == "c"


@pytest.mark.parametrize("command", ["run", "resume"])
def test_a_sweep_with_a_failed_trial_exits_1_and_says_which(tmp_path, monkeypatch, capsys, command):
    """A sweep whose trials all errored used to exit 0 (seen: a cluster without the bucket's keys
    failed every trial and `remem sweep run` still succeeded). Any ERROR row now makes run and
    resume exit 1 with one line naming the trials and the way to retry them; a clean one exits 0."""
    import remem_ray.sweep as sweep
    from remem_ray.sweep.results import SweepSummary, TrialRow

    rows = [TrialRow("a1", "TERMINATED", {}), TrialRow("b2", "ERROR", {}), TrialRow("c3", "ERROR", {})]
    rows[2].failure = "TrainingDivergedError: teacher diverged in epoch 2 (...): remove it to train this teacher again"
    summary = SweepSummary("smoke", str(tmp_path / "sweeps" / "smoke"), METRIC, trials=rows)
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, address=None, verbose=False: summary)
    monkeypatch.setattr(sweep, "resume_sweep", lambda spec, address=None, verbose=False: summary)
    monkeypatch.setattr(sweep, "locate_sweep", lambda *a, **k: SweepSpec.model_validate({"name": "smoke"}))
    args = ["sweep", command, str(SMOKE) if command == "run" else "smoke"]
    assert main(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("remem: error")]
    assert errors == [
        f"remem: error: 2 of 3 trials failed (b2, c3); each one's error is in its trial folder under "
        f"{tmp_path}/sweeps/smoke; `remem sweep resume {tmp_path}/sweeps/smoke` runs them again (1 of them "
        f"diverged, a teacher or a student: refused at once until the diverged.json their error names is removed)"
    ]
    rows[1].state = rows[2].state = "TERMINATED"
    assert main(args) == 0 and "remem: error" not in capsys.readouterr().err


class _FakeRay:
    """Stands in for ray.init/shutdown: these tests are about the driver's own bookkeeping."""

    def __init__(self, fail_first: Exception | None = None):
        self.temp_dirs: list[str] = []
        self.inits: list[dict] = []  # each call's dashboard port and the State API address then
        self.fail_first = fail_first

    def init(self, **kwargs):
        import os
        from types import SimpleNamespace

        self.inits.append({"port": kwargs["dashboard_port"], "api": os.environ.get("RAY_API_SERVER_ADDRESS")})
        if self.fail_first is not None:
            error, self.fail_first = self.fail_first, None
            raise error
        self.temp_dirs.append(kwargs["_temp_dir"])
        return SimpleNamespace(dashboard_url="127.0.0.1:8265")

    def shutdown(self):
        pass


def test_the_driver_gives_back_its_working_dir_and_removes_its_ray_temp_dir(tmp_path, monkeypatch, capsys):
    import os
    import sys

    from remem_ray.sweep import driver

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.chdir(tmp_path)
    with driver._stable_working_dir(), driver.ray_session(None):
        assert os.getcwd() != str(tmp_path) and os.path.isdir(fake.temp_dirs[0])
    assert os.getcwd() == str(tmp_path)
    assert not os.path.exists(fake.temp_dirs[0])  # a finished sweep leaves no Ray temp folder behind

    with pytest.raises(RuntimeError), driver._stable_working_dir(), driver.ray_session(None):
        raise RuntimeError("a trial broke the sweep")
    assert os.getcwd() == str(tmp_path)
    assert os.path.isdir(fake.temp_dirs[1])  # a failed one keeps Ray's logs, and says where
    assert f"{fake.temp_dirs[1]}/session_latest/logs" in capsys.readouterr().err
    os.rmdir(fake.temp_dirs[1])

    monkeypatch.setenv("REMEM_KEEP_RAY_LOGS", "1")  # kept on request (a credential scan, debugging)
    with driver.ray_session(None):
        pass
    assert os.path.isdir(fake.temp_dirs[2])
    os.rmdir(fake.temp_dirs[2])


def test_input_refused_inside_the_ray_session_leaves_no_ray_temp_dir_and_no_logs_hint(monkeypatch, capsys):
    """A refusal once Ray is up (gpus_per_worker: auto on a cluster without GPUs) is one line:
    no pointer to Ray's logs (nothing ran), and the temp folder goes with Ray."""
    import os
    import sys

    from remem_ray.errors import ResourceError
    from remem_ray.sweep import driver

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(ResourceError), driver.ray_session(None):
        raise ResourceError("sweep.resources.teacher.gpus_per_worker: auto, but the Ray cluster has no GPUs now")
    assert not os.path.exists(fake.temp_dirs[0])
    assert "Ray's logs" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before trials", "after trials"])
def test_a_storage_error_or_lost_lease_after_trials_ran_keeps_rays_logs_a_refusal_before_does_not(
    where, tmp_path, monkeypatch, capsys
):
    """A lost driver lease (SweepDriven) or a storage error while Tune runs or the summary is
    written is a UserInputError, as a refusal at the start is: before, it too removed Ray's temp
    folder, the logs of a sweep whose trials ran, with no word of them."""
    import contextlib
    import os
    import sys

    from remem_ray.sweep import driver, progress
    from remem_ray.sweep.driver_lease import SweepDriven
    from remem_ray.sweep.gpu_shares import NodeResources

    @contextlib.contextmanager
    def console(*args, **kwargs):
        yield type("Console", (), {"show": staticmethod(lambda line: None)})()

    fake = _FakeRay()
    fake.is_initialized = lambda: False  # no run-slot book actor
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(progress, "sweep_console", console)
    monkeypatch.setattr(driver, "cluster_nodes", lambda: [NodeResources(0, 8)])
    if where == "before trials":  # refused while the driver sets up, as auto without GPUs is
        spec, error = _spec(resources={"teacher": {"gpus_per_worker": "auto"}}), ResourceError
    else:
        spec, error = _spec(), SweepDriven
    spec = SweepSpec.model_validate({**spec.model_dump(), "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), spec.name)
    with pytest.raises(error), driver._driving(spec, layout, None, False, "4 trials", export=None):
        raise SweepDriven("sweep: its driver lease was taken over by another driver")
    kept = os.path.exists(fake.temp_dirs[0])
    named = f"Ray's logs of this sweep are in {fake.temp_dirs[0]}" in capsys.readouterr().err
    assert (kept, named) == ((False, False) if where == "before trials" else (True, True))
    if kept:
        import shutil

        shutil.rmtree(fake.temp_dirs[0])


def test_a_dashboard_port_taken_before_ray_binds_it_is_replaced_not_fatal(monkeypatch):
    """Seen in the suite: the port picked for the dashboard went to another process before Ray
    bound it, and the sweep died ("Failed to find a valid port for dashboard ... address already
    in use"). The driver picks ports below the kernel's ephemeral range and tries another."""
    import os
    import sys
    import tempfile

    from remem_ray.sweep import driver

    taken = Exception(
        "Failed to find a valid port for dashboard after 0 retries: [Errno 98] error while attempting "
        "to bind on address ('127.0.0.1', 44217): address already in use"
    )
    fake = _FakeRay(fail_first=taken)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with driver.ray_session(None):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{fake.inits[-1]['port']}"
    assert len(fake.inits) == 2 and fake.inits[0]["port"] != fake.inits[1]["port"]
    assert all(i["api"] == f"http://127.0.0.1:{i['port']}" for i in fake.inits)  # each try names its own
    assert all(19999 < i["port"] < driver._ephemeral_low() for i in fake.inits)
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # put back as it was

    other = _FakeRay(fail_first=RuntimeError("the GCS would not start"))  # anything else still fails
    monkeypatch.setitem(sys.modules, "ray", other)
    made: list[str] = []  # this driver's temp folders (another test worker makes its own meanwhile)
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    with pytest.raises(RuntimeError, match="GCS"), driver.ray_session(None):
        pass
    assert len(other.inits) == 1
    assert made and not [path for path in made if os.path.exists(path)]  # an empty temp folder does not stay


def test_a_sweep_that_asks_no_gpus_on_a_gpu_cluster_is_told_so():
    from remem_ray.sweep.driver import unused_gpus_note

    cpu_only = SweepSpec.model_validate({"name": "s"})
    note = unused_gpus_note(cpu_only, cluster_gpus=8)
    assert note is not None and "8 GPU(s)" in note and "gpus_per_worker" in note
    assert unused_gpus_note(cpu_only, cluster_gpus=0) is None  # nothing to use
    assert unused_gpus_note(cpu_only.model_copy(update={"device": "cpu"}), 8) is None  # CPUs asked for
    half = {"teacher": {"gpus_per_worker": 0.5}}
    teacher_only = unused_gpus_note(SweepSpec.model_validate({"name": "s", "sweep": {"resources": half}}), 8)
    assert teacher_only is not None and "sweep.resources.student.gpus_per_worker is 0" in teacher_only
    both = {**half, "student": {"gpus_per_worker": 0.5}}
    assert unused_gpus_note(SweepSpec.model_validate({"name": "s", "sweep": {"resources": both}}), 8) is None


def test_a_submitted_sweep_leaves_no_staging_folder_behind(monkeypatch, tmp_path):
    """`remem sweep submit` stages the spec in a folder Ray uploads as the job's working dir
    while submit_job runs; the folder goes afterwards, submitted or refused."""
    from pathlib import Path

    from remem_ray.config import load_sweep_spec
    from remem_ray.errors import ResourceError
    from remem_ray.sweep import jobs

    seen: list[Path] = []

    class Client:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
            staging = Path(runtime_env["working_dir"])
            assert (staging / "sweep.yaml").is_file()  # there while Ray uploads it
            seen.append(staging)
            if self.fail:
                raise RuntimeError("the dashboard refused the job")
            return submission_id

    spec = load_sweep_spec(None, {"storage.root": str(tmp_path / "r")})
    monkeypatch.setattr(jobs, "jobs_client", lambda address: Client(fail=False))
    assert jobs.submit_sweep(spec, "http://127.0.0.1:8265").startswith("remem-")
    monkeypatch.setattr(jobs, "jobs_client", lambda address: Client(fail=True))
    with pytest.raises(ResourceError, match="job submission"):
        jobs.submit_sweep(spec, "http://127.0.0.1:8265")
    assert len(seen) == 2 and not any(p.exists() for p in seen)


class _Jobs:
    """A Ray Jobs client that keeps what it was asked to submit."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
        self.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env, "id": submission_id})
        return submission_id


def test_a_submitted_sweep_is_stopped_as_ctrl_c_would_and_its_folder_must_be_the_clusters(monkeypatch, in_tmp, capsys):
    """Ray's job supervisor SIGTERMs a stopped job and SIGKILLs it 3 s later: the driver ended
    without Tune's last save, its summary or its leases' release. And a spec naming no storage
    root submitted this machine's ./remem-results made absolute: each cluster node wrote its own."""
    from remem_ray.sweep import jobs

    client = _Jobs()
    monkeypatch.setattr(jobs, "jobs_client", lambda address: client)
    (in_tmp / "s.yaml").write_text(yaml.safe_dump({"name": "demo"}))
    assert main(["sweep", "submit", "s.yaml", "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: storage.root: the default ./remem-results is a folder of this machine")
    (in_tmp / "r.yaml").write_text(yaml.safe_dump({"name": "demo", "storage": {"root": "results"}}))
    assert main(["sweep", "submit", "r.yaml", "--address", "http://127.0.0.1:8265"]) == 2
    assert "storage.root: results is a folder of this machine" in capsys.readouterr().err
    assert main(["sweep", "submit", "s.yaml", "--address", "http://127.0.0.1:8265", "--storage", "~/results"]) == 2
    assert "storage.root: ~/results is a folder of this machine" in capsys.readouterr().err
    assert client.submitted == []  # nothing started
    assert main(["sweep", "submit", "s.yaml", "--address", "http://127.0.0.1:8265", "--storage", "s3://b/p"]) == 0
    (job,) = client.submitted
    assert job["entrypoint"] == "python -m remem_ray.cli sweep run sweep.yaml"
    assert job["runtime_env"]["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(job["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    assert sorted(p.name for p in in_tmp.iterdir()) == ["r.yaml", "s.yaml"]


def test_a_resume_given_a_dashboard_runs_on_the_cluster_as_a_job(monkeypatch, in_tmp, capsys):
    """`sweep resume --address http://HEAD:8265` was refused ("`remem sweep submit` takes it"),
    and submit cannot resume: a submitted sweep had no way back but a hand-written `ray job submit`."""
    from remem_ray.sweep import jobs

    client = _Jobs()
    monkeypatch.setattr(jobs, "jobs_client", lambda address: client)
    dashboard = ("--address", "http://127.0.0.1:8265")
    assert main(["sweep", "resume", "s3://b/p/sweeps/demo", *dashboard, "--endpoint", "http://s3.local:9000"]) == 0
    assert main(["sweep", "resume", "demo", *dashboard, "--storage", "s3://b/p/"]) == 0
    first, second = client.submitted
    assert first["entrypoint"] == (
        "python -m remem_ray.cli sweep resume s3://b/p/sweeps/demo --endpoint http://s3.local:9000"
    )
    assert second["entrypoint"] == "python -m remem_ray.cli sweep resume s3://b/p/sweeps/demo"
    assert first["id"].startswith("remem-demo-") and first["runtime_env"]["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert capsys.readouterr().out.splitlines() == [first["id"], second["id"]]
    assert "working_dir" not in first["runtime_env"]  # a resume ships nothing: storage holds the sweep
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # as Ray's docs export the dashboard
    assert main(["sweep", "resume", "s3://b/p/sweeps/demo"]) == 0 and len(client.submitted) == 3
    monkeypatch.delenv("RAY_ADDRESS")
    capsys.readouterr()
    for argv in (["demo"], ["demo", "--storage", "results"], ["results/sweeps/demo"], ["~/shared/sweeps/demo"]):
        assert main(["sweep", "resume", *argv, *dashboard]) == 2
        err = capsys.readouterr().err
        assert err.startswith("remem: error: NAME|URI: ") and err.count("\n") == 1, err
    # the endpoint travels in the job's command line, shown by the dashboard and `ray job list`
    assert main(["sweep", "resume", "s3://b/p/sweeps/demo", *dashboard, "--endpoint", "http://k:secret@s3:9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: --endpoint: ") and "secret" not in err
    assert len(client.submitted) == 3
    assert list(in_tmp.iterdir()) == []


def test_sweep_stop_says_how_the_job_ends_by_how_it_was_submitted(monkeypatch, capsys):
    """A job `ray job submit` made (or one submitted before RAY_JOB_STOP_SIGNAL was set) is still
    SIGTERMed and killed 3 s later: the stop's line promised it a Ctrl-C's save."""
    from types import SimpleNamespace

    from remem_ray.sweep import jobs

    class Running:
        def __init__(self, env_vars):
            self.env_vars, self.stopped = env_vars, []

        def get_job_info(self, job_id):
            return SimpleNamespace(runtime_env={"env_vars": self.env_vars})

        def stop_job(self, job_id):
            self.stopped.append(job_id)

        def get_job_status(self, job_id):
            return SimpleNamespace(value="RUNNING")

    ours, theirs = Running(dict(jobs.STOP_ENV)), Running({})
    for client, says in ((ours, "stopping as Ctrl-C would"), (theirs, "Ray ends it with SIGTERM, then SIGKILL")):
        monkeypatch.setattr(jobs, "jobs_client", lambda address, client=client: client)
        assert main(["sweep", "stop", "j", "--address", "http://127.0.0.1:8265"]) == 0
        out, err = capsys.readouterr()
        assert out == "job j: RUNNING\n" and says in err and client.stopped == ["j"]


class _JobOfLines:
    """A Ray Jobs client whose job has printed `lines` and ended; its dashboard streams them in
    chunks, as a job writes them, and the whole log is one read."""

    def __init__(self, lines: list[str]) -> None:
        self.lines, self.whole_reads = lines, 0

    def get_job_info(self, job_id):
        if job_id != "j":
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return {}

    def get_job_logs(self, job_id):
        self.whole_reads += 1
        return "".join(self.lines)

    async def tail_job_logs(self, job_id):
        for line in self.lines:
            yield line

    def get_job_status(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(value="SUCCEEDED")


def test_following_a_jobs_logs_prints_each_chunk_once_and_says_what_failed(monkeypatch):
    """`--follow` read the job's whole log every 2 s, to print what was new: megabytes a read as a
    long sweep's log grew. It follows the dashboard's stream now (which ends after the job's last
    lines), never reading the whole log. Failed before: the whole log was read on every loop."""
    import io
    from types import SimpleNamespace

    from remem_ray.errors import ResourceError, UserInputError
    from remem_ray.sweep import jobs

    lines = ["sweep started\n", "trial table\n", "summary: s/summary.json\n"]
    client = _JobOfLines(lines)
    monkeypatch.setattr(jobs, "jobs_client", lambda address: client)
    out = io.StringIO()
    assert jobs.job_logs("http://h:8265", "j", follow=True, out=out) == "SUCCEEDED"
    assert out.getvalue() == "".join(lines) and client.whole_reads == 0
    out = io.StringIO()
    assert jobs.job_logs("http://h:8265", "j", out=out) == "SUCCEEDED"  # no --follow: the log as it is
    assert out.getvalue() == "".join(lines) and client.whole_reads == 1

    # the stream ended normally with the job still running (a dashboard restart): followed again
    # from where it was; before, `logs --follow` returned "RUNNING" with exit 0
    statuses = iter(["RUNNING", "SUCCEEDED"])
    streams = iter([lines[:2], ["sweep st", "arted\ntrial table\nsumm", "ary: s/summary.json\n"]])

    async def restarted(job_id):
        for chunk in next(streams):
            yield chunk

    client.tail_job_logs = restarted
    client.get_job_status = lambda job_id: SimpleNamespace(value=next(statuses))
    monkeypatch.setattr(jobs.time, "sleep", lambda seconds: None)
    out = io.StringIO()
    assert jobs.job_logs("http://h:8265", "j", follow=True, out=out) == "SUCCEEDED"
    assert out.getvalue() == "".join(lines)

    async def cut(job_id):
        yield "sweep started\n"
        raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    client.tail_job_logs = cut  # the dashboard went away mid-stream: one line, what was shown stays
    out = io.StringIO()
    with pytest.raises(ResourceError, match=r"^--address: could not follow the job's logs: WebSocket connection"):
        jobs.job_logs("http://h:8265", "j", follow=True, out=out)
    assert out.getvalue() == "sweep started\n"
    with pytest.raises(UserInputError, match="^job: no job 'k' on this cluster$"):
        jobs.job_logs("http://h:8265", "k")

    def unreachable(job_id):
        raise ConnectionError("HTTPConnectionPool(host='h', port=8265): Max retries exceeded\nmore")

    client.get_job_info = unreachable  # not "no such job": the dashboard did not answer
    with pytest.raises(ResourceError, match=r"^--address: could not ask for job 'j': HTTPConnectionPool"):
        jobs.job_logs("http://h:8265", "j")


@pytest.mark.parametrize(("status", "code"), [("SUCCEEDED", 0), ("RUNNING", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_sweep_logs_exits_1_for_a_job_that_failed_or_was_stopped(status, code, monkeypatch):
    """`remem sweep logs J --follow && deploy` went on after someone stopped the job (exit 0)."""
    from remem_ray.sweep import jobs

    monkeypatch.setattr(jobs, "job_logs", lambda address, job, follow=False: status)
    assert main(["sweep", "logs", "j", "--address", "http://h:8265", "--follow"]) == code


class _FakeClusterRay:
    """Stands in for Ray's task API over a cluster of named nodes: each node answers the storage
    check with what `answers` says for it ("late": never within the wait)."""

    def __init__(self, answers: dict[str, object]) -> None:
        import types

        self.answers, self.cancelled, self.placed, self.left = answers, [], [], set()
        self.exceptions = types.SimpleNamespace(RayError=RuntimeError)
        strategies = types.ModuleType("ray.util.scheduling_strategies")
        strategies.NodeAffinitySchedulingStrategy = lambda node_id, soft: (node_id, soft)
        self.modules = {
            "ray": self,
            "ray.util": types.ModuleType("ray.util"),
            "ray.util.scheduling_strategies": strategies,
        }

    def install(self, monkeypatch) -> None:
        import sys

        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)

    def nodes(self):
        dead = {"NodeID": "dead0000dead", "Alive": False, "NodeManagerAddress": "10.0.0.9"}
        return [dead] + [
            {"NodeID": f"{name}{'0' * 8}", "Alive": name not in self.left, "NodeManagerAddress": f"10.0.0.{i}"}
            for i, name in enumerate(self.answers)
        ]

    def remote(self, **options):
        fake = self

        class Task:
            def __init__(self, strategy=None):
                self.strategy = strategy

            def options(self, scheduling_strategy):
                return Task(scheduling_strategy)

            def remote(self, storage, inputs):
                node_id, soft = self.strategy
                assert soft is False and options["num_cpus"] == 0
                fake.placed.append(node_id)
                fake.inputs = inputs
                return node_id[:-8]  # the "object ref": the node's name

        return lambda fn: Task()

    def wait(self, refs, num_returns, timeout):
        late = [r for r in refs if self.answers[r] == "late"]
        return [r for r in refs if r not in late], late

    def cancel(self, ref, force):
        self.cancelled.append(ref)

    def get(self, ref):
        answer = self.answers[ref]
        if answer == "leaves":  # the node left the cluster before the check ran there
            self.left.add(ref)
            raise RuntimeError("TaskUnschedulableError: the node is gone")
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_the_cluster_storage_check_runs_on_every_alive_node_and_names_the_ones_that_fail(monkeypatch, capsys):
    """A GPU node group with other credentials than the head's fails every trial placed on it:
    the check runs once on each alive node, pinned there, and the refusal names every node that
    failed (all answers read: none left for Ray to report as an unhandled error)."""
    from remem_ray.config import load_sweep_spec
    from remem_ray.errors import ResourceError
    from remem_ray.sweep import driver

    weights = {"teacher.weights": "s3://b/w/teacher.pth", "student.weights": "/on/the/nodes.pth"}
    spec = load_sweep_spec(None, {"storage.root": "/tmp/remem-units-root", **weights})
    denied = "storage: access denied to s3://b/p"
    fake = _FakeClusterRay({"head": None, "gpua": denied, "gpub": denied, "gpuc": "late"})
    fake.install(monkeypatch)
    with pytest.raises(ResourceError) as refused:
        driver.preflight_from_cluster(spec, "10.0.0.0:6379")
    assert fake.placed == ["head00000000", "gpua00000000", "gpub00000000", "gpuc00000000"]  # not the dead node
    assert fake.inputs == [("teacher.weights", "s3://b/w/teacher.pth")]  # the nodes look at the s3:// inputs too
    message = str(refused.value)
    assert message.startswith(f"{denied} (checked from a node of the Ray cluster at 10.0.0.0:6379, ")
    assert "10.0.0.1 (gpua0000), 10.0.0.2 (gpub0000)" in message
    assert "going on" not in capsys.readouterr().err  # no "going on" before a stop

    late = _FakeClusterRay({"head": None, "gpua": "late", "gpub": "leaves"})  # not waited for, not blamed
    late.install(monkeypatch)
    driver.preflight_from_cluster(spec, "10.0.0.0:6379")
    assert late.cancelled == ["gpua"] and "not checked from 2 of the 3 nodes" in capsys.readouterr().err

    broken = _FakeClusterRay({"head": None, "gpua": RuntimeError("ModuleNotFoundError: remem_ray")})
    broken.install(monkeypatch)
    with pytest.raises(ResourceError, match=r"could not run: RuntimeError: .* 10.0.0.1 \(gpua0000\)"):
        driver.preflight_from_cluster(spec, "10.0.0.0:6379")


def test_an_interrupted_sweep_ends_with_code_130_and_the_command_that_continues_it(capsys):
    """Ctrl-C makes Tune return normally, running trials and all: the end printed the table and
    returned 0 (1 only for failed trials), so a script went on as if the sweep were done."""
    from remem_ray.cli import _print_end
    from remem_ray.sweep.results import SweepSummary, TrialRow

    rows = [TrialRow("a", "TERMINATED", {}), TrialRow("b", "RUNNING", {}), TrialRow("c", "ERROR", {})]
    summary = SweepSummary("s", "/r/sweeps/s", "m", trials=rows, unfinished=2)
    assert _print_end(summary, endpoint="http://127.0.0.1:9000") == 130
    err = capsys.readouterr().err
    assert err.startswith("remem: interrupted: 2 trials not run to the end, 1 failed;")
    assert "`remem sweep resume /r/sweeps/s --endpoint http://127.0.0.1:9000` continues the sweep" in err
    assert _print_end(SweepSummary("s", "/r/sweeps/s", "m", trials=rows[:1])) == 0


def test_a_resume_checks_the_stored_spec_on_this_machine_before_ray_starts(in_tmp, capsys):
    """A resume on a machine without the spec's local weights file failed trial by trial (each one
    retried): the spec was checked only by `run`. Failed before: Ray started."""
    import ray

    spec = SweepSpec(
        name="weights-gone", storage={"root": str(in_tmp / "results")}, teacher={"weights": str(in_tmp / "gone.pth")}
    )
    folder = in_tmp / "results" / "sweeps" / "weights-gone"
    folder.mkdir(parents=True)
    (folder / "sweep_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["sweep", "resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remem: error: teacher.weights: weights file not found") and err.count("\n") == 1
    assert not ray.is_initialized()


def test_a_sweep_stopped_before_its_tune_experiment_existed_can_be_run_again(in_tmp, capsys):
    """Killed between writing its spec and creating the Tuner, a sweep was stuck: `run` refused the
    name (its spec existed) and `resume` found nothing to restore. Failed before: run refused."""
    from remem_ray.sweep.driver import _check_new

    spec = SweepSpec(name="early", storage={"root": str(in_tmp / "results")})
    layout = SweepLayout(Storage.from_config(spec.storage), "early")
    layout.experiment.write_text("sweep_spec.json", json.dumps(spec.model_dump(mode="json")))
    _check_new(layout, None)  # nothing to resume: run may start it over
    assert main(["sweep", "resume", layout.experiment.path()]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first trial" in err and "`remem sweep run`" in err


def test_a_stored_sweep_spec_that_a_run_now_refuses_still_reads_for_status_and_reports():
    from remem_ray.errors import SpecError
    from remem_ray.spec_checks import check_spec

    spec = SweepSpec.model_validate({"student": {"teacher_checkpoint": "/old/teacher/epoch_4"}})
    with pytest.raises(SpecError, match="^student.teacher_checkpoint: a sweep distils each trial's own teacher"):
        check_spec(spec)


def test_a_resume_does_not_refuse_settings_a_new_run_would(in_tmp, capsys):
    """Sweeps started before a run refused a gpu_budget below one trial must still resume: the
    resume cannot change the stored setting, and it ran once."""
    spec = SweepSpec.model_validate(
        {
            "name": "old",
            "storage": {"root": str(in_tmp / "results")},
            "sweep": {"resources": {"teacher": {"num_workers": 2, "gpus_per_worker": 1}, "gpu_budget": 1}},
        }
    )
    folder = in_tmp / "results" / "sweeps" / "old"
    folder.mkdir(parents=True)
    (folder / "sweep_spec.json").write_text(json.dumps(spec.model_dump(mode="json")))
    assert main(["sweep", "resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "gpu_budget" not in err and "stopped before its first trial" in err  # past the spec's checks


def test_an_unreadable_experiment_state_is_one_line_not_an_empty_sweep(tmp_path, capsys):
    """Before, `sweep status` showed an empty table (exit 0), `sweep best` said no trial had
    reported yet, and `remem report` replaced the sweep's report with empty plots."""
    from remem_ray.sweep.results import load_trials

    layout = SweepLayout(Storage(str(tmp_path)), "s")
    assert load_trials(layout) == []  # no state saved yet: no trials, no error
    layout.experiment.write_text(
        "experiment_state-2026-12-07_00-39-46.json", '{"trial_data": [["{\\"trial_id\\": \\"ab'
    )
    with pytest.raises(ResourceError, match=r"^sweep: Tune's experiment state in .*/sweeps/s cannot be read \("):
        load_trials(layout)


def test_the_searchers_divergence_lookup_reads_the_teacher_and_student_records(tmp_path):
    """What the searcher reads when a trial errors (DivergenceLookup): the point's teacher record,
    else its student's, from the registries a trial writes them to; None where neither diverged."""
    from remem_ray.sweep.registry import TeacherRegistry
    from remem_ray.sweep.search import DivergenceLookup
    from remem_ray.sweep.students import StudentRegistry

    spec = SweepSpec.model_validate({**_spec().model_dump(), "storage": {"root": str(tmp_path)}})
    layout = SweepLayout.of(spec)
    lookup = pickle.loads(pickle.dumps(DivergenceLookup(spec)))  # pickled with the searcher
    point = {"rho": 0.2, "alpha": 0.8, "teacher_epoch": 2, "kd_temperature": 2.0}
    other = {**point, "kd_temperature": 4.0}  # same teacher, another student
    assert lookup(point) is None and lookup(other) is None

    run = spec.run_spec(other)
    StudentRegistry(layout.students).record_divergence(run.student_key(), "student loss nan at epoch 2")
    assert lookup(point) is None
    assert lookup(other).startswith("student loss nan at epoch 2 (recorded in ")

    TeacherRegistry(layout.teachers).record_divergence(run.teacher_key(), "teacher loss inf at epoch 1")
    assert lookup(point).startswith("teacher loss inf at epoch 1 (recorded in ")
    assert lookup(other).startswith("teacher loss inf")  # the teacher's record first: it ended the trial


def test_a_driver_resource_no_node_has_is_said_at_the_start():
    """A mistyped driver_resource (or a head started without it) left every trial pending with
    nothing on the console but "0 running, N pending" every 30 s."""
    from remem_ray.sweep.driver import driver_resource_note

    spec = SweepSpec.model_validate({"name": "s", "sweep": {"resources": {"driver_resource": "remem_drivers"}}})
    head, gpu_node = {"CPU": 0.0, "remem_driver": 64.0}, {"CPU": 8.0, "GPU": 1.0}
    note = driver_resource_note(spec, [head, gpu_node])
    assert note is not None and note.startswith("sweep.resources.driver_resource: no node")
    assert "'remem_drivers'" in note and "\n" not in note
    right = SweepSpec.model_validate({"name": "s", "sweep": {"resources": {"driver_resource": "remem_driver"}}})
    assert driver_resource_note(right, [head, gpu_node]) is None
    assert driver_resource_note(SweepSpec.model_validate({"name": "s"}), [gpu_node]) is None  # none asked for


@pytest.mark.parametrize("verb", ["best", "export"])
def test_a_sweep_without_a_finished_student_says_what_its_trials_do_and_exits_1(verb, tmp_path, monkeypatch, capsys):
    """`sweep best` said "no trial has reported a student yet" beside trials that had; `sweep
    export` exited 2, the code for bad input, for a sweep that had only not finished one yet."""
    import json
    from types import SimpleNamespace

    from remem_ray.cli import main
    from remem_ray.storage import Storage
    from remem_ray.sweep import results
    from remem_ray.sweep.layout import SWEEP_SPEC_FILE, SweepLayout

    def trial(tid, status):
        result = {METRIC: 0.5, "best_test_acc": 0.5, "epoch": 1, "epochs": 8}
        return SimpleNamespace(trial_id=tid, status=status, config={"rho": 0.1, "alpha": 0.9}, last_result=result)

    monkeypatch.setattr(results, "load_trials", lambda layout: [trial("a", "RUNNING"), trial("b", "ERROR")])
    spec = SweepSpec.model_validate({"name": "s", "storage": {"root": str(tmp_path)}})
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    layout.experiment.write_text(SWEEP_SPEC_FILE, json.dumps(spec.model_dump(mode="json")))
    argv = ["sweep", verb, layout.experiment.uri()] + (["--to", str(tmp_path / "out")] if verb == "export" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "remem: sweep: s has no finished student yet (1 running or pending, 1 failed)\n"
    assert not (tmp_path / "out").exists()
