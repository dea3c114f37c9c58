"""remem_ray.sweep.report: what its plots draw from a sweep's summary."""

from __future__ import annotations

import pytest
from helpers.leases import leave_lease_held_by_an_ended_process

from remem_ray.contract import EPOCH, EPOCHS, METRIC, best_trial
from remem_ray.sweep.report import (
    best_so_far,
    heatmap_cells,
    plot_best_so_far,
    plot_information_plane,
    plot_student_vs_teacher,
)
from remem_ray.sweep.results import SweepSummary, TrialRow


def _result(row: TrialRow) -> dict:
    """A row's last result as Tune reports it: a stopped student reported fewer epochs than given."""
    return {METRIC: row.student_val_acc, EPOCH: 3 if row.stopped_early else 8, EPOCHS: 8}


def _row(trial, rho, alpha, val, stopped):
    return TrialRow(trial, "TERMINATED", {"rho": rho, "alpha": alpha}, student_val_acc=val, stopped_early=stopped)


def test_the_heat_map_shows_each_cells_best_student_as_the_best_line_ranks_them_and_marks_stopped_ones():
    summary = SweepSummary(
        "s",
        "e",
        METRIC,
        trials=[
            _row("a", 0.0, 0.9, 0.95, stopped=False),
            _row("b", 0.0, 0.9, 0.97, stopped=True),  # the sweep's best: its cell shows it, hatched
            _row("c", 0.05, 0.9, 0.85, stopped=True),  # the cell's only student was stopped
            _row("d", 0.1, 0.9, 0.90, stopped=True),
            _row("e", 0.1, 0.9, 0.90, stopped=False),  # a tie: the finished one, as the best line
        ],
    )
    rhos, alphas, grid, stopped = heatmap_cells(summary)
    assert rhos == [0.0, 0.05, 0.1] and alphas == [0.9]
    # before, a cell's finished student always won: the map showed 0.95 where the best line
    # named trial b (0.97, stopped early) the sweep's best
    assert grid == [[0.97, 0.85, 0.90]] and stopped == [[True, True, False]]
    ended = [(r.trial_id, r.state, _result(r)) for r in summary.trials]
    assert best_trial(ended) == "b"


def test_the_heat_maps_labels_are_dark_on_light_cells_and_light_on_dark_ones(monkeypatch):
    """The best cell (viridis' yellow top) carried white text, barely readable."""
    from remem_ray.sweep import report

    drawn = {}
    monkeypatch.setattr(report, "_png", lambda plt, fig: drawn.setdefault("texts", fig.axes[0].texts) and b"")
    summary = SweepSummary("s", "e", METRIC, trials=[_row("a", 0.0, 0.9, 0.95, False), _row("b", 0.1, 0.9, 0.80, True)])
    report.plot_heatmap(summary)
    colours = {t.get_text().split()[0]: t.get_color() for t in drawn["texts"]}
    assert colours == {"0.950": "black", "0.800": "white"}
    assert (report.ink_on((1.0, 1.0, 1.0, 1.0)), report.ink_on((0.0, 0.0, 0.0, 1.0))) == ("black", "white")


def test_the_heat_map_leaves_out_failed_and_running_trials_partial_scores():
    """A failed or running trial's score is from the epoch it got to: it drew as a cell (hatched
    as if ASHA had stopped it) and could top the best-so-far line."""
    failed = TrialRow("d", "ERROR", {"rho": 0.1, "alpha": 0.9}, student_val_acc=0.99)
    running = TrialRow("e", "RUNNING", {"rho": 0.0, "alpha": 0.9}, student_val_acc=0.98)
    summary = SweepSummary("s", "e", METRIC, trials=[_row("a", 0.0, 0.9, 0.95, stopped=False), failed, running])
    rhos, alphas, grid, stopped = heatmap_cells(summary)
    assert rhos == [0.0] and alphas == [0.9] and grid == [[0.95]] and stopped == [[False]]


def test_the_best_so_far_curve_follows_the_order_trials_ended_not_their_ids():
    """Trial ids are random hex: the plot's "best so far" in id order told no story at all (the
    default sweep's showed its first finished trial fourth). Running and failed trials stay out."""

    def ended(trial, val, at, stopped=False):
        return TrialRow(trial, "TERMINATED", {}, student_val_acc=val, stopped_early=stopped, last_report_at=at)

    rows = [
        ended("0e44", 0.87, at=300.0, stopped=True),
        ended("7ace", 0.94, at=100.0),
        ended("accb", 0.90, at=100.0, stopped=True),  # the same second: by id
        ended("e812", 0.93, at=200.0),
        TrialRow("ffff", "RUNNING", {}, student_val_acc=0.99, last_report_at=50.0),
    ]
    curve = best_so_far(SweepSummary("s", "e", METRIC, trials=rows))
    assert [(r.trial_id, best) for r, best in curve] == [("7ace", 0.94), ("accb", 0.94), ("e812", 0.94), ("0e44", 0.94)]
    assert [r.student_val_acc for r, _ in curve] == [0.94, 0.90, 0.93, 0.87]


@pytest.mark.parametrize("stopped", [(), (False,), (True,), (False, True)])
def test_the_scatter_plots_draw_any_mix_of_finished_and_stopped_students(stopped):
    rows = [
        TrialRow(f"t{i}", "TERMINATED", {}, student_val_acc=0.8 + i / 100, teacher_val_acc=0.7, teacher_mi=4.0 + i)
        for i in range(len(stopped))
    ]
    for row, early in zip(rows, stopped):
        row.stopped_early, row.last_report_at = early, 1.0
    summary = SweepSummary("s", "e", METRIC, trials=rows)
    for plot in (plot_best_so_far, plot_information_plane, plot_student_vs_teacher):
        assert plot(summary).startswith(b"\x89PNG")


def test_a_final_result_sent_again_after_a_resume_counts_from_when_its_run_ended():
    """A run restarted after its last epoch reports that epoch again (`replayed`): Tune's timestamp
    is the resume's, long after the trial really ended."""
    from remem_ray.sweep.results import ended_at

    assert ended_at({"timestamp": 500, "epoch_started_at": 100.0, "epoch_seconds": 4.0}) == 500.0
    assert ended_at({"timestamp": 900, "epoch_started_at": 100.0, "epoch_seconds": 4.0, "replayed": 1}) == 104.0
    assert ended_at({}) is None


def test_one_student_score_is_coloured_mid_scale_not_at_its_bottom():
    from remem_ray.sweep.report import score_norm

    assert score_norm([0.8565])(0.8565) == pytest.approx(0.5)
    assert score_norm([0.8565, 0.8565])(0.8565) == pytest.approx(0.5)
    assert (score_norm([0.7, 0.9])(0.7), score_norm([0.7, 0.9])(0.9)) == (0.0, 1.0)


def test_a_best_student_the_scheduler_stopped_says_so_where_it_is_named():
    """Its score is the one at the epoch it reached; the best line, report.md and `sweep best`
    named it without saying so, beside a heat map that calls finished students the best."""
    from remem_ray.sweep.report import Importances, _markdown
    from remem_ray.sweep.results import format_table

    best = TrialRow("bbbb", "TERMINATED", {"rho": 0.05}, epochs_done=3, student_val_acc=0.9, student_test_acc=0.88)
    best.stopped_early = True
    summary = SweepSummary("s", "e", METRIC, trials=[best], best=best)
    assert "(teacher val -); stopped early after student epoch 3" in format_table(summary)
    assert "test 0.8800; stopped early after student epoch 3; checkpoint" in _markdown(summary, Importances({}))


def test_the_trial_table_shows_a_zero_as_its_column_does_and_a_small_rate_in_full():
    """rho 0 read "0" in a column of "0.050"s (the newcomer's table); 2e-05 must not read 0.000."""
    from remem_ray.sweep.results import format_table

    rows = [
        TrialRow(t, "TERMINATED", {"rho": rho, "student_lr": lr})
        for t, rho, lr in (("a", 0.0, 2e-5), ("b", 0.05, 2e-3), ("c", 0.0525, 0.0012), ("d", 0.0734219, 0.0014))
    ]
    lines = format_table(SweepSummary("s", "e", METRIC, trials=rows, best=None)).splitlines()
    assert lines[0].split()[2] == "rho" and lines[0].split()[5] == "student_lr"
    # sampled values keep 3 significant digits: two learning rates read 0.001 alike
    assert [line.split()[2] for line in lines[1:5]] == ["0.000", "0.050", "0.0525", "0.0734"]
    assert [line.split()[5] for line in lines[1:5]] == ["2e-05", "0.002", "0.0012", "0.0014"]


def test_remem_report_while_a_driver_runs_the_sweep_writes_an_interim_report(tmp_path):
    """It wrote the sweep folder's report.md and plots: a driver ending meanwhile wrote its final
    report, and the CLI's, of the state before, landed over it and stayed (a review's finding)."""
    import itertools

    from remem_ray.leases import Lease
    from remem_ray.storage import Storage
    from remem_ray.sweep.driver_lease import DRIVER_LEASE, live_driver
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.report import REPORT_FILE, report_folder, write_report

    layout = SweepLayout(Storage(str(tmp_path)), "s")
    watched = lambda layout: live_driver(layout, 60.0)  # noqa: E731  (returns at once without a live holder)
    folder, line = report_folder(layout, watched)
    assert folder.uri() == layout.experiment.uri() and line is None  # no driver: the sweep's own report
    driver = Lease(layout.experiment.child(DRIVER_LEASE), "driver h1 pid 7 (ab12cd34)", 60)
    assert driver.try_acquire()
    ticks = itertools.count()  # a clock of one second a look
    silent = lambda layout: live_driver(layout, 60.0, sleep=lambda s: None, clock=ticks.__next__)  # noqa: E731
    assert report_folder(layout, silent)[1] is None  # its holder shows no life: it has ended (on another host)
    beating = lambda layout: live_driver(layout, 60.0, sleep=lambda s: driver.renew(), clock=ticks.__next__)  # noqa: E731
    folder, line = report_folder(layout, beating)
    assert folder.uri() == layout.experiment.uri("interim-report")
    assert line.startswith("sweep s: run by driver h1 pid 7 (ab12cd34): an interim report, in ")
    summary = SweepSummary("s", layout.experiment.uri(), METRIC, trials=[_row("a", 0.0, 0.9, 0.9, stopped=False)])
    paths = write_report(summary, layout, folder)
    assert paths["report"] == folder.uri(REPORT_FILE) and folder.is_file(REPORT_FILE)
    assert not layout.experiment.is_file(REPORT_FILE)  # the driver's to write
    driver.release()
    assert report_folder(layout, watched)[0].uri() == layout.experiment.uri()
    # a driver of this host killed before it released: no driver runs the sweep
    leave_lease_held_by_an_ended_process(layout.experiment.child(DRIVER_LEASE), "driver h1 pid 8 (ef56ab78)")
    assert report_folder(layout, watched)[0].uri() == layout.experiment.uri()


def test_the_reports_words_on_teacher_mi_name_the_settings_it_is_measured_with():
    """The report module stays torch-free (drivers import it), so it spells the numbers out."""
    from remem_ray.contract import HEADLINE_MI
    from remem_ray.insight.information import FIXED_SIGMA, MI_REFERENCE_TEMPERATURE
    from remem_ray.sweep.report import AXES, Importances, _markdown

    assert HEADLINE_MI == ("targets/fixed", "i_xt_upper")
    assert f"sigma {FIXED_SIGMA:g} (nats)" in AXES["information_plane"][0]
    text = _markdown(SweepSummary("s", "e", METRIC), Importances({}))
    assert f"temperature {MI_REFERENCE_TEMPERATURE:g}) with a fixed noise scale (sigma {FIXED_SIGMA:g})" in text


def test_the_report_names_a_best_student_whose_test_accuracy_is_missing():
    """`report.md` formatted the best's test accuracy with :.4f: a result without one (None) was
    a TypeError after summary.json was written, and the sweep's end showed a traceback."""
    from remem_ray.sweep.report import Importances, _markdown

    best = _row("a", 0.05, 0.9, 0.8, stopped=False)
    text = _markdown(SweepSummary("s", "e", METRIC, trials=[best], best=best), Importances({}))
    assert "Best student: trial `a`" in text and "val 0.8000, test -" in text
