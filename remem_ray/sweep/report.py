"""A sweep's report: report.md and PNG plots written into the sweep folder.

Plots: student accuracy over rho x alpha, student vs teacher accuracy per trial, the
information plane (teacher MI vs teacher error, coloured by student accuracy), Optuna's
parameter importances, and the best student accuracy so far by trial.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from remem_ray.search_params import ALPHA, RHO
from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.results import SweepSummary, TrialRow, fmt_value, format_table, stopped_note
from remem_ray.sweep.study import newest_study

REPORT_FILE = "report.md"
INTERIM_DIR = "interim-report"  # `remem report` while a driver runs the sweep (report_folder)
PLOTS = {
    "heatmap": "student_acc_rho_alpha.png",
    "student_vs_teacher": "student_vs_teacher.png",
    "information_plane": "information_plane.png",
    "importances": "param_importances.png",
    "best_so_far": "best_so_far.png",
}
FIGSIZE = (6.4, 4.8)
DPI = 100


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    return plt, fig, fig.add_subplot()


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


# x label, y label, title of the plots whose texts do not fit on the call's line
AXES = {
    "student_vs_teacher": (
        "teacher val accuracy (fraction)",
        "student val accuracy (fraction)",
        "Student vs teacher accuracy per trial",
    ),
    "information_plane": (
        "teacher I(X; T) upper bound, targets, sigma 0.1 (nats)",
        "teacher val error (fraction)",
        "Information plane of the teacher checkpoints",
    ),
    "importances": (
        "importance for student val accuracy (fANOVA share, fraction)",
        "parameter",
        "Optuna parameter importances",
    ),
}


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    """Every plot carries a title and axis labels with units."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(plt, fig)


def _scored(summary: SweepSummary):
    """Rows whose student's score is final: ended trials (finished or stopped by the scheduler),
    never a failed one's partial score nor a running one's."""
    return [r for r in summary.trials if r.state == "TERMINATED" and r.student_val_acc is not None]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def heatmap_cells(summary: SweepSummary):
    """(rhos, alphas, grid[alpha][rho], stopped[alpha][rho]): each cell's best student's val
    accuracy, marked stopped where that student is one ASHA stopped early. By the sweep's own
    best rule (contract.best_trial): a stopped student is kept as any other, and a map that
    showed a cell's lower finished score hid the trial the best line named."""
    rows = _scored(summary)
    rhos = sorted({r.params[RHO.name] for r in rows})
    alphas = sorted({r.params[ALPHA.name] for r in rows})
    grid = [[math.nan] * len(rhos) for _ in alphas]
    stopped = [[False] * len(rhos) for _ in alphas]
    for i, a in enumerate(alphas):
        for j, rho in enumerate(rhos):
            cell = [r for r in rows if r.params[RHO.name] == rho and r.params[ALPHA.name] == a]
            if cell:  # on a tie, a finished student before a stopped one (as best_trial)
                best = max(cell, key=lambda r: (r.student_val_acc, not r.stopped_early))
                grid[i][j], stopped[i][j] = best.student_val_acc, bool(best.stopped_early)
    return rhos, alphas, grid, stopped


def ink_on(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever reads on a cell of colour `rgba`: white on viridis' yellow
    top (the best cell, the one users look for) was barely visible. By relative luminance
    (WCAG's weights on linearised sRGB); 0.179 splits black's contrast from white's."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def plot_heatmap(summary: SweepSummary) -> bytes:
    plt, fig, ax = _figure()
    rhos, alphas, grid, stopped = heatmap_cells(summary)
    if rhos:
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label="best student's val accuracy (fraction)")
        ax.set_xticks(range(len(rhos)), [f"{v:.3g}" for v in rhos])
        ax.set_yticks(range(len(alphas)), [f"{v:.3g}" for v in alphas])
        for i in range(len(alphas)):
            for j in range(len(rhos)):
                if not math.isnan(grid[i][j]):
                    ink = ink_on(im.cmap(im.norm(grid[i][j])))
                    text = f"{grid[i][j]:.3f}" + ("\nstopped early" if stopped[i][j] else "")
                    ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=8)
                    if stopped[i][j]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec=ink, alpha=0.4))
    else:
        _no_data(ax, "no trial has reported a student yet")
    title = "Student accuracy over rho x alpha (best trial per cell)"
    return _finish(plt, fig, ax, RHO.axis, ALPHA.axis, title)


# A student stopped early by ASHA scored at an early epoch: drawn hollow beside those run to the end
ENDINGS = ((False, "student run to its end"), (True, "student stopped early"))


def _by_ending(items: list, stopped_early: Callable[[Any], bool] = lambda r: r.stopped_early) -> Iterator:
    """(stopped, label, the items of that ending) for each ending among `items`."""
    for stopped, label in ENDINGS:
        group = [item for item in items if stopped_early(item) == stopped]
        if group:
            yield stopped, label, group


def _face(stopped: bool, colour: Any) -> Any:
    return "none" if stopped else colour  # hollow: stopped early


def _ending_legend(ax, rows: list) -> None:
    """A legend of the marker shapes alone (grey: the colours mean accuracy)."""
    from matplotlib.lines import Line2D

    endings = list(_by_ending(rows))
    handles = [
        Line2D([], [], marker="o", linestyle="", color="tab:gray", markerfacecolor=_face(stopped, "tab:gray"))
        for stopped, _, _ in endings
    ]
    ax.legend(handles, [label for _, label, _ in endings])


def plot_student_vs_teacher(summary: SweepSummary) -> bytes:
    plt, fig, ax = _figure()
    rows = [r for r in _scored(summary) if r.teacher_val_acc is not None]
    for stopped, label, group in _by_ending(rows):
        x, y = [r.teacher_val_acc for r in group], [r.student_val_acc for r in group]
        ax.scatter(x, y, label=label, edgecolors="tab:blue", facecolors=_face(stopped, "tab:blue"))
    for r in rows:
        ax.annotate(r.trial_id, (r.teacher_val_acc, r.student_val_acc), fontsize=7)
    if rows:
        ax.legend()
    else:
        _no_data(ax, "no trial has reported a student yet")
    return _finish(plt, fig, ax, *AXES["student_vs_teacher"])


def score_norm(scores: list[float]):
    """The colour scale of student scores; one score alone (or all equal) sits mid-scale: a
    zero-width scale coloured it as its bottom, under a bar that widened to show otherwise."""
    from matplotlib.colors import Normalize

    lo, hi = min(scores), max(scores)
    return Normalize(lo - 0.05, hi + 0.05) if hi <= lo else Normalize(lo, hi)


def plot_information_plane(summary: SweepSummary) -> bytes:
    plt, fig, ax = _figure()
    rows = [r for r in _scored(summary) if r.teacher_mi is not None and r.teacher_val_acc is not None]
    if rows:
        norm = score_norm([r.student_val_acc for r in rows])
        cmap = plt.get_cmap("viridis")
        for stopped, label, group in _by_ending(rows):
            colours = [cmap(norm(r.student_val_acc)) for r in group]
            ax.scatter(
                [r.teacher_mi for r in group],
                [1.0 - r.teacher_val_acc for r in group],
                edgecolors=colours,
                facecolors=_face(stopped, colours),
                linewidths=1.5,
                label=label,
            )
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="student val accuracy (fraction)")
        _ending_legend(ax, rows)
    else:
        _no_data(ax, "no teacher MI recorded")
    return _finish(plt, fig, ax, *AXES["information_plane"])


@dataclass(frozen=True)
class Importances:
    """fANOVA shares per parameter, and what they were computed on (`basis`, for the reader)."""

    values: dict[str, float]
    basis: str = ""


def param_importances(layout: SweepLayout) -> Importances:
    """Optuna's parameter importances from the searcher state Tune saved (empty if too few trials)."""
    study = newest_study(layout)
    return Importances({}) if study is None else importances_of(study)


def importances_of(searched) -> Importances:
    """fANOVA importances (seeded: the same study gives the same report) over the distinct points
    run. Under ASHA most trials end early (the default sweep finished one of six, and the plot was
    always empty): where fewer than half of the ended trials finished, every ended trial's score
    at the deepest student epoch all of them reached is compared instead."""
    import optuna
    from optuna.trial import TrialState

    from remem_ray.sweep.distinct import DUPLICATE_OF

    # a duplicate suggestion is answered with its first trial's outcome: counted, it would weigh the
    # points the sampler returns to more than once, though each ran once
    distinct = [t for t in searched.trials if DUPLICATE_OF not in t.user_attrs]
    complete = [t for t in distinct if t.state == TrialState.COMPLETE]
    scored = [(t, t.value) for t in complete]
    basis = f"the {len(complete)} finished trials' best student val accuracy"
    ended = [t for t in distinct if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values]
    if 2 * len(complete) < len(ended):  # ASHA stopped most: the finished few say little
        step = min(max(t.intermediate_values) for t in ended)
        at_step = [(t, t.intermediate_values[step]) for t in ended if step in t.intermediate_values]
        if len(at_step) > len(complete):
            scored = at_step
            # counted, not inferred from the finished count: a finished trial rerun after a resume
            # reports only the epochs after its restart, and may have none at `step`
            stopped = sum(1 for t, _ in at_step if t.state == TrialState.PRUNED)
            basis = (
                f"{len(at_step)} trials' best student val accuracy at student epoch {step}, the deepest all of "
                f"them reached (ASHA stopped {stopped} of them early)"
            )
    varied = (
        {name for name in scored[0][0].params if len({t.params.get(name) for t, _ in scored}) > 1} if scored else set()
    )
    if len(scored) < 2 or not varied:
        return Importances({})
    study = optuna.create_study(direction=searched.direction)
    study.add_trials(
        [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=v) for t, v in scored]
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        values = optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(varied))
    except (RuntimeError, ValueError):
        return Importances({})
    return Importances(dict(values), basis)


def plot_importances(importances: Importances) -> bytes:
    plt, fig, ax = _figure()
    if importances.values:
        names = list(importances.values)
        ax.barh(names, [importances.values[n] for n in names], color="tab:green")
        ax.invert_yaxis()
    else:
        _no_data(ax, "too few trials with comparable scores for importances")
    xlabel, ylabel, title = AXES["importances"]
    if importances.values:  # what the shares compare, under the axis's own label
        xlabel += "\n" + textwrap.fill(f"on {importances.basis}", 64)
    return _finish(plt, fig, ax, xlabel, ylabel, title)


def best_so_far(summary: SweepSummary) -> list[tuple[TrialRow, float]]:
    """Each ended trial, in the order the trials ended (trial ids are random: their order is
    none), with the best student accuracy of the sweep once it had ended."""
    rows = sorted(
        _scored(summary), key=lambda r: (math.inf if r.last_report_at is None else r.last_report_at, r.trial_id)
    )
    curve, best = [], -math.inf
    for r in rows:
        best = max(best, r.student_val_acc)
        curve.append((r, best))
    return curve


def plot_best_so_far(summary: SweepSummary) -> bytes:
    plt, fig, ax = _figure()
    curve = best_so_far(summary)
    x = range(1, len(curve) + 1)
    points = [(i, r) for i, (r, _) in zip(x, curve)]
    for stopped, label, group in _by_ending(points, lambda point: point[1].stopped_early):
        xs, ys = [i for i, _ in group], [r.student_val_acc for _, r in group]
        ax.plot(xs, ys, "o", label=label, color="tab:gray", markerfacecolor=_face(stopped, "tab:gray"))
    ax.plot(x, [best for _, best in curve], "-", label="best so far", color="tab:red")
    if curve:
        ax.legend()
    else:
        _no_data(ax, "no trial has reported a student yet")
    return _finish(
        plt,
        fig,
        ax,
        "trials in the order they ended",
        "student val accuracy (fraction)",
        "Best student accuracy so far",
    )


def write_report(summary: SweepSummary, layout: SweepLayout, folder: Storage | None = None) -> dict[str, str]:
    """Write the plots and report.md into `folder` (default: the sweep folder); returns {name: uri}."""
    importances = param_importances(layout)
    images = {
        "heatmap": plot_heatmap(summary),
        "student_vs_teacher": plot_student_vs_teacher(summary),
        "information_plane": plot_information_plane(summary),
        "importances": plot_importances(importances),
        "best_so_far": plot_best_so_far(summary),
    }
    folder = folder or layout.experiment
    for key, data in images.items():
        folder.write_bytes(PLOTS[key], data)
    folder.write_text(REPORT_FILE, _markdown(summary, importances))
    return {**{k: folder.uri(PLOTS[k]) for k in images}, "report": folder.uri(REPORT_FILE)}


def report_folder(layout: SweepLayout, live_driver: Callable[[SweepLayout], str | None]) -> tuple[Storage, str | None]:
    """Where `remem report` writes: the sweep folder, or `interim-report/` in it while a live driver
    runs the sweep (`live_driver`: its holder, if it shows life; driver_lease.live_driver), with
    the line that says so. That driver writes the sweep folder's report as it ends, and a report of
    the state before, written over it a moment later, would stay."""
    holder = live_driver(layout)
    if holder is None:
        return layout.experiment, None
    folder = layout.experiment.child(INTERIM_DIR)
    return folder, (
        f"sweep {layout.name}: run by {holder}: an interim report, in {folder.uri()}; its driver writes "
        f"{layout.experiment.uri(REPORT_FILE)} as it ends"
    )


def _markdown(summary: SweepSummary, importances: Importances) -> str:
    lines = [f"# Sweep {summary.name}", "", f"Experiment: `{summary.experiment}`", ""]
    if summary.best is not None:
        b = summary.best
        lines += [
            f"Best student: trial `{b.trial_id}`, params `{b.params}`, val {fmt_value(b.student_val_acc)}, "
            f"test {fmt_value(b.student_test_acc)}{stopped_note(b)}; checkpoint `{b.student_checkpoint}`.",
            "",
        ]
    lines += ["```", format_table(summary), "```", ""]
    captions = {
        "heatmap": "Student accuracy over rho x alpha",
        "student_vs_teacher": "Student vs teacher accuracy per trial",
        "information_plane": "Information plane: teacher MI vs teacher error, coloured by student accuracy",
        "importances": "Optuna parameter importances",
        "best_so_far": "Best student accuracy so far, in the order trials ended",
    }
    for key, caption in captions.items():
        lines += [f"## {caption}", "", f"![{caption}]({PLOTS[key]})", ""]
    if importances.values:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in importances.values.items())
        lines += [f"Importances: {shares} (on {importances.basis}; few trials make them a rough guide)", ""]
    lines += [
        "The heat map colours a cell by its best student, as the best line ranks them; where that "
        "student is one ASHA stopped early, the cell shows the score it had reached, hatched and "
        "marked 'stopped early'. The "
        "other plots draw stopped trials hollow, with the score they had reached (the best-so-far "
        "line counts them: their students are kept as any other).",
        "",
    ]
    lines += [
        "Teacher MI: upper bound of I(X; T) on the distillation targets (softmax at temperature 4) with "
        "a fixed noise scale (sigma 0.1), in nats (see remem_ray/insight/information.py).",
        "",
    ]
    return "\n".join(lines)
