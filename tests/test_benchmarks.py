"""The benchmark scripts stay runnable (tiny sizes), and their arithmetic is right."""

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
    for measure in ("SAM step / AdamW step", "cached targets / student only", "per-parameter loop"):
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
