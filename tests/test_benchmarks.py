"""The benchmark scripts stay runnable (tiny sizes), and their arithmetic is right."""

from pathlib import Path

import pytest

from benchmarks import gpu, harness, steps
from benchmarks.sweep_overhead import covered_seconds, refuse_errored


def test_covered_seconds_is_the_length_of_the_union():
    assert covered_seconds([]) == 0.0
    assert covered_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == pytest.approx(4.0)


def test_per_round_ratio_cancels_a_slow_round():
    samples = {"a": [2.0, 20.0, 2.0], "b": [1.0, 10.0, 1.0]}
    assert harness.median_ratio(samples, "a", "b") == 2.0
    assert harness.medians(samples)["a"] == 2.0


TINY = ["--teacher", "vit_micro_patch4", "--student", "resnet10t", "--img", "16"]  # models small enough for CPU


def test_card_peaks():
    assert gpu.card_peak("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gpu.card_peak("NVIDIA H100 PCIe", None) == 756e12
    assert gpu.card_peak("Some GPU", None) is None and gpu.card_peak("Some GPU", 100) == 100e12


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_gpu_script_runs_all_workloads_end_to_end_on_tiny_models(capsys, tmp_path, monkeypatch, pipeline):
    monkeypatch.setenv("REMEM_CACHE_DIR", str(tmp_path / "cache"))
    args = "--device cpu --batch 8 --student-batch 8 --images 80 --views 2 --steps 1 --warmup 1 --pipeline"
    assert gpu.main([*TINY, *args.split(), pipeline]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| teacher SAM") or line.startswith("| student")]
    assert len(rows) == 3 and any("online teacher" in r for r in rows) and any("cached targets" in r for r in rows)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        step_ips, e2e_ips, ratio = (float(c.replace(",", "")) for c in cells[1:4])
        assert step_ips > 0 and e2e_ips > 0 and ratio == pytest.approx(e2e_ips / step_ips, rel=0.05, abs=0.01)
    assert f"pipeline: {pipeline}" in out


def test_step_script_runs_on_tiny_models(capsys):
    assert steps.main([*TINY, "--rounds", "2", "--sam-model", "vit_micro_patch4", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for measure in ("SAM step / AdamW step", "cached targets / student only", "per-parameter loop", "fused AdamW"):
        assert measure in out


def test_throughputs_keep_three_significant_digits():
    """A slow machine's 1.44 img/s printed as "1" made the table's own ratio disagree with its cells."""
    assert gpu.rate(1.4449) == "1.44" and gpu.rate(28.04) == "28" and gpu.rate(12345.6) == "12,346"


def test_replay_trials_report_what_asha_and_the_searcher_read(monkeypatch):
    """The tabular replay's trials report a student's keys: without "epoch" ASHA had no rungs."""
    from ray import tune

    from benchmarks.search_efficiency import point_key, table_trial
    from remem_ray.contract import METRIC, stopped_early
    from remem_ray.sweep.search import TIME_ATTR

    reported = []
    monkeypatch.setattr(tune, "report", reported.append)
    table_trial({"rho": 0.05, "alpha": 0.9, "teacher_epoch": 10}, {point_key(0.05, 0.9, 10): [0.5, 0.7]})
    assert [(r[TIME_ATTR], r[METRIC]) for r in reported] == [(1, 0.5), (2, 0.7)]
    assert stopped_early(reported[0]) and not stopped_early(reported[-1])


def test_sweep_overhead_gives_no_figures_for_a_sweep_with_an_errored_trial():
    """An errored trial ran fewer epochs: its sweep looked faster (seen with Tune's reuse_actors)."""
    rows = [{"trial_id": "a", "state": "TERMINATED"}, {"trial_id": "b", "state": "TERMINATED"}]
    refuse_errored({"trials": rows})
    with pytest.raises(SystemExit, match="trial.s. b errored"):
        refuse_errored({"trials": [rows[0], {"trial_id": "b", "state": "ERROR"}]})


# ------------------------------------------------------------------ the whole-sweep GPU benchmark


def test_gpu_busy_share_is_the_mean_utilization_of_the_samples():
    """nvidia-smi's utilization.gpu is the share of each sample period with a kernel running."""
    from benchmarks.gpu_sweep import busy_share, parse_samples

    recorded = "100, 30000\n0, 30000\n[N/A], 1\n50, 31000\n\n90, 29000\n"
    samples = parse_samples(recorded)
    assert samples == [(100.0, 30000.0), (0.0, 30000.0), (50.0, 31000.0), (90.0, 29000.0)]
    assert busy_share(samples) == pytest.approx(0.60)
    assert busy_share([]) != busy_share([])  # NaN: no samples, no figure


FIRST_EPOCH = {  # a recorded first epoch's marks (seconds since some origin)
    "process_started_at": 12.0,
    "module_imported_at": 20.5,
    "loop_entered_at": 23.0,
    "device_ready_at": 24.0,
    "data_ready_at": 27.0,
    "task_built_at": 30.0,
    "epoch_started_at": 30.5,
    "epoch_seconds": 9.0,
    "compile_seconds": 4.0,
}


def test_a_runs_start_split_adds_up_to_fit_to_first_epoch():
    from benchmarks.sweep_overhead import START_MARKS, start_parts, start_split

    split = start_split(FIRST_EPOCH, fit_called_at=10.0)
    assert list(split) == [name for name, _ in START_MARKS]
    assert list(split.values()) == [2.0, 8.5, 2.5, 1.0, 3.0, 3.0, 0.5]
    assert sum(split.values()) == pytest.approx(FIRST_EPOCH["epoch_started_at"] - 10.0)
    assert start_parts(FIRST_EPOCH, 10.0) == (2.0, 8.5, 2.5, 7.5)  # sweep_overhead's coarser four
    phase = start_split(FIRST_EPOCH, fit_called_at=22.0, process_up=True)  # the switch at 22
    assert list(phase.values())[:3] == [0.0, 0.0, 1.0]
    older = start_split({"epoch_started_at": 30.5}, 10.0)  # a run that recorded no marks
    assert all(v != v for v in list(older.values())[:-1])


def test_a_run_row_compares_its_first_epoch_with_the_later_ones():
    from benchmarks.gpu_sweep import run_table
    from benchmarks.sweep_overhead import run_row

    first = {**FIRST_EPOCH, "eval_seconds": 3.25, "peak_gpu_memory_mb": 9000.0}
    later = ({"epoch_seconds": s, "eval_seconds": 0.75, "peak_gpu_memory_mb": 10752.4} for s in (4.0, 5.0, 4.5))
    history = [first, *later]
    row = run_row("teacher", history, fit_called_at=10.0)
    assert row["first_epoch_seconds"] == 9.0 and row["later_epoch_seconds"] == 4.5 and row["compile_seconds"] == 4.0
    assert row["first_eval_seconds"] == 3.25 and row["later_eval_seconds"] == 0.75
    assert row["peak_gpu_memory_mb"] == 10752.4  # the run's peak, over its epochs
    out = run_table([row, {**row, "role": "student"}])
    assert "| teacher " in out and "| student " in out and "| 8.5 " in out and "| 4.5 " in out and "| 3.2 " in out
    assert "| 10752 " in out
    older = run_row("teacher", [FIRST_EPOCH, {"epoch_seconds": 4.0}], 10.0)  # before eval_seconds was kept
    assert older["first_eval_seconds"] != older["first_eval_seconds"] and "| - " in run_table([older])


def test_the_gpu_sweeps_check_names_what_its_accounting_lacks():
    """CI runs `python -m benchmarks.gpu_sweep --smoke --check` (a real tiny sweep, .ci/run):
    this is the rule it applies."""
    from benchmarks.gpu_sweep import accounting_problems
    from benchmarks.sweep_overhead import run_row

    teacher = run_row("teacher", [FIRST_EPOCH], 10.0)
    student = run_row("student", [FIRST_EPOCH], 10.0)
    assert accounting_problems([teacher, student], 0.4, [], smoke=True) == []
    assert len(accounting_problems([teacher, student], 0.4, [], smoke=False)) == 1  # a GPU run with no samples
    assert "teacher and student" in accounting_problems([teacher], 0.4, [], smoke=True)[0]
    unmarked = run_row("student", [{"epoch_started_at": 30.5, "epoch_seconds": 1.0}], 10.0)
    assert "start marks" in accounting_problems([teacher, unmarked], 0.4, [], smoke=True)[0]
    assert "epoch cover" in accounting_problems([teacher, student], 0.0, [], smoke=True)[0]


def test_the_gpu_sweep_holds_each_run_to_the_memory_its_share_was_sized_for():
    """`gpus_per_worker: auto` on the card: a run's reserved peak over what the probe sized its
    share for is a problem --check reports (the share would overfill a card it shares)."""
    from benchmarks.gpu_sweep import probe_check

    def role(need):
        return {"gpus_per_worker": 0.5, "need_mb": need}

    record = {
        "roles": {"teacher": role(30000.0), "student": role(12000.0)},
        "teacher_run_distils": True,
        "process_mb": 1024.0,
    }
    runs = [
        {"role": "teacher", "peak_gpu_memory_mb": 25000.0},
        {"role": "student phase in its teacher's run", "peak_gpu_memory_mb": 26000.0},
        {"role": "student", "peak_gpu_memory_mb": 11500.0},  # over 12,000 - 1,024
    ]
    rows, problems = probe_check(record, runs)
    assert [r[0] for r in rows[1:]] == ["teacher", "student phase in its teacher's run", "student"]
    assert rows[1][1:] == ["28976", "25000", "yes"]  # the merged share: the larger need
    assert problems == ["a student run reserved 11500 MiB, over the 10976 MiB its GPU share was sized for"]
    assert probe_check(None, runs) == ([], [])  # fixed shares: nothing to hold them to


def test_sweep_overhead_reads_the_concurrency_from_the_console():
    from benchmarks.sweep_overhead import trials_at_a_time

    console = "[08:11:02] GPU shares (auto): ...\n[08:11:02] sweep s: 6 trials, 4 at a time; log /x/sweep.log; Ray d\n"
    assert trials_at_a_time(console) == 4
    with pytest.raises(SystemExit):
        trials_at_a_time("no such line")


@pytest.mark.parametrize("smoke", [True, False])
def test_the_gpu_sweeps_spec_is_valid_and_runs_each_point_once(tmp_path, smoke):
    """The GPU sweep's spec validates here (no GPU needed to read it) and its space holds exactly
    its trials' points: 6 trials are 6 distinct points, nothing asked twice."""
    from benchmarks.gpu_sweep import spec_for
    from remem_ray.config import SweepSpec
    from remem_ray.sweep.search import space_size

    trials = 2 if smoke else 6
    spec = SweepSpec.model_validate({**spec_for(smoke, tmp_path, trials, 0.5), "storage": {"root": str(tmp_path)}})
    assert space_size(spec) == trials and spec.student.teacher_targets == "cached"
    if not smoke:
        assert (spec.teacher.model, spec.student.model, spec.data.img_size) == ("vit_base_patch16_224", "resnet18", 224)
        assert spec.sweep.resources.teacher.gpus_per_worker == 0.5 and spec.max_concurrent_trials() == 2
        raw = spec_for(smoke, tmp_path, trials, "auto")
        auto = SweepSpec.model_validate({**raw, "storage": {"root": str(tmp_path)}})
        assert auto.sweep.resources.auto_roles() == ["teacher", "student"]
        assert auto.sweep.max_concurrent_trials is None  # the sized shares decide it


def test_a_teacher_profile_summary_counts_device_time_and_host_syncs_per_step():
    """benchmarks.teacher_profile's arithmetic on recorded key averages (CI runs the script itself
    with --smoke --check): kernel time against the window's wall, the CUDA runtime's synchronize
    calls per step (not aten::_local_scalar_dense: on AdamW's CPU step counts it waits for nothing)."""
    from benchmarks.teacher_profile import OpRow, summarize, top

    rows = [
        # a CPU op's self device time repeats its kernels'; an annotation spans them: neither counts
        OpRow("aten::mm", 40, 2_000.0, 150_000.0),
        OpRow("ProfilerStep#4", 10, 1_000.0, 300_000.0),
        OpRow("sm90_xmma_gemm_bf16", 40, 0.0, 150_000.0, kernel=True),
        OpRow("void flash_fwd_kernel", 20, 0.0, 90_000.0, kernel=True),
        OpRow("cudaDeviceSynchronize", 1, 5_000.0, 0.0),  # the benchmark's own, at the window's end
        OpRow("cudaStreamSynchronize", 10, 30_000.0, 0.0),
        OpRow("aten::_local_scalar_dense", 300, 3_000.0, 0.0),
        OpRow("cudaLaunchKernel", 900, 12_000.0, 0.0),
    ]
    summary = summarize(rows, steps=10, wall_s=0.3, own_syncs=1)
    assert summary["wall_ms_per_step"] == pytest.approx(30.0)
    assert summary["device_ms_per_step"] == pytest.approx(24.0)
    assert summary["device_idle_share"] == pytest.approx(0.2)
    assert summary["host_syncs_per_step"] == 1.0
    cpu_only = summarize([OpRow("aten::mm", 4, 9_000.0, 0.0)], steps=2, wall_s=0.02)
    assert cpu_only["device_idle_share"] != cpu_only["device_idle_share"] and cpu_only["host_syncs_per_step"] == 0
    ranked = top(rows, "self_device_us", 2)
    assert [r[0] for r in ranked[1:]] == ["sm90_xmma_gemm_bf16", "void flash_fwd_kernel"] and ranked[1][-1] == "62.5%"
    assert top(rows, "self_cpu_us", 1)[1][0] == "cudaStreamSynchronize"


def test_the_teacher_profiles_window_is_the_steps_the_profiler_records(monkeypatch):
    """The window's end mark came one step late: after an unrecorded step and after the profiler's
    stop-and-collect, so a step's wall read about 1/12 high and the device's idle share with it."""
    import benchmarks.teacher_profile as tp

    events = []

    class Profile:
        def step(self):
            events.append("profiler step")

    monkeypatch.setattr(tp, "sync", lambda: None)
    monkeypatch.setattr(tp.time, "perf_counter", lambda: float(len(events)))
    steps, marks = 3, []
    last = tp.last_recorded_step(steps)
    for index in tp.stepping(range(10), Profile(), last, marks):
        events.append(f"batch {index}")
    # wait (WAIT_STEPS steps), warm up (1), record `steps`: the batches between the marks are those
    recorded = [e for e in events[int(marks[0]) : int(marks[1])] if e.startswith("batch")]
    assert recorded == [f"batch {i}" for i in range(tp.WAIT_STEPS + 1, tp.WAIT_STEPS + 1 + steps)]


def test_the_gpu_sweeps_figures_stop_where_the_sweep_was_stopped_and_a_sweep_cut_short_still_counts(tmp_path):
    """At the deadline's Ctrl-C the GPU idles while the sweep ends: those samples diluted the
    share. A sweep stopped before any student epoch (or before its summary) crashed the
    accounting (max() of nothing, summary.json missing): the call's main figures were lost."""
    from benchmarks.gpu_sweep import busy_share, parse_samples
    from benchmarks.sweep_overhead import collect

    recorded = "100.000,90,30000\n100.500,80,30000\n101.000,0,30000\n101.500,0,2000\n"
    assert busy_share(parse_samples(recorded, until=100.6)) == pytest.approx(0.85)
    assert busy_share(parse_samples(recorded)) == pytest.approx(0.425)
    (tmp_path / "sweeps" / "cut" / "teacher-trainings").mkdir(parents=True)  # nothing stored yet
    data = collect(tmp_path, "cut")
    assert data["runs"] == [] and data["summary"] == {"trials": []}
    assert data["worker_rss_mb"] != data["worker_rss_mb"]  # NaN: no epoch, no figure


def test_a_sweep_killed_after_its_grace_is_accounted_for_as_stopped(tmp_path, monkeypatch):
    import sys

    from benchmarks import gpu_sweep

    monkeypatch.setattr(gpu_sweep, "STOP_GRACE_S", 0.5)
    ignores_ctrl_c = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)",
    ]
    with open(tmp_path / "log", "w") as log:
        returncode, stopped_at = gpu_sweep.run_until(ignores_ctrl_c, str(tmp_path), log, deadline=1.0)
    assert returncode < 0 and stopped_at is not None


def test_the_slot_simulation_runs_the_drivers_policy_and_weighed_slots_keep_gpus_busier():
    """benchmarks.slot_sim drives the real SlotPolicy and RunSlotBook on a simulated clock: on
    the paper's shapes (4-GPU teachers, 1-GPU students, 16 GPUs) with 4 teachers shared by 32
    trials, counting runs held 4 trials at once (students on 4 of 16 GPUs); weighing them fills
    the budget. Every teacher is trained once either way."""
    from benchmarks.slot_sim import simulate
    from remem_ray.config import load_sweep_spec
    from remem_ray.sweep.slots import SlotMeasure, measure_of

    spec = load_sweep_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "cifar100_vit_b.yaml")
    keys = [f"k{i % 4}" for i in range(spec.sweep.num_samples)]
    counted = simulate(spec, SlotMeasure(4), keys, teacher_h=6, student_h=2)
    weighed = simulate(spec, measure_of(spec), keys, teacher_h=6, student_h=2)
    assert counted.teachers_trained == weighed.teachers_trained == 4
    # counted: 6 h of 4 teachers on 16 GPUs, then 32 students 4 at a time (16 h on 4 GPUs)
    assert counted.hours == pytest.approx(22, abs=0.1) and counted.busy_share == pytest.approx(0.45, abs=0.01)
    # weighed: the same teachers, then the students 16 at a time (4 h)
    assert weighed.hours == pytest.approx(10, abs=0.1) and weighed.busy_share == pytest.approx(1.0, abs=0.01)
