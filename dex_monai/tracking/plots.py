# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The comparison's figures: loss curves, final metrics, expert-use heatmaps side by side."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dex_monai.tracking.report import RunSummary, metric_groups


def _grid_figure(n_panels: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = int(math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def plot_loss_curves(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    One panel per metric whose name contains "loss", one line per run (x = step).

    Returns:
        the PNG path, or ``None`` when no run logged a loss metric.
    """
    names = sorted({k for s in summaries for k in s.histories})
    if not names:
        return None
    fig, axes = _grid_figure(len(names), 3, (5.0, 3.4))
    for ax, name in zip(axes, names):
        for i, s in enumerate(summaries):
            history = s.histories.get(name)
            if not history:
                continue
            steps, values = zip(*history)
            ax.plot(steps, values, label=s.label, color=_colour(i), marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Loss curves")
    return _save(fig, Path(path))


#: Size of the final-metrics figure (inches at 100 dpi): fixed, whatever the number of metrics, runs or experts.
FINAL_METRICS_SIZE = (15.0, 5.5)

#: Rows per panel of the final-metrics figure; further metrics are named under the panel (all are in the CSV).
MAX_METRICS_PER_PANEL = 8


def plot_final_metrics(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    One figure of fixed size :data:`FINAL_METRICS_SIZE` with a panel per group of :func:`metric_groups` (losses,
    task metrics, routing summaries): a row per metric (final value), a bar per run, the value written at its end.
    Groups no run logged are left out; at most :data:`MAX_METRICS_PER_PANEL` rows a panel.

    Returns:
        the PNG path, or ``None`` when no run logged a compared metric.
    """
    from matplotlib.figure import Figure

    groups = {k: v for k, v in metric_groups([k for s in summaries for k in s.metrics]).items() if v}
    if not groups:
        return None
    fig = Figure(figsize=FINAL_METRICS_SIZE, layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    n_runs = len(summaries)
    height = 0.8 / max(n_runs, 1)
    for ax, (group, names) in zip(axes, groups.items()):
        shown, hidden = names[:MAX_METRICS_PER_PANEL], names[MAX_METRICS_PER_PANEL:]
        rows = np.arange(len(shown))
        finite = [abs(s.metrics[n]) for s in summaries for n in shown if np.isfinite(s.metrics.get(n, np.nan))]
        span = max(finite, default=1.0) or 1.0
        for i, s in enumerate(summaries):
            values = np.array([s.metrics.get(n, np.nan) for n in shown], dtype=np.float64)
            y = rows - 0.4 + height * (i + 0.5)
            ax.barh(y, np.nan_to_num(values), height=height * 0.9, color=_colour(i), label=s.label)
            for yy, v in zip(y, values):
                text = f"{v:.4g}" if np.isfinite(v) else "n/a"
                ax.annotate(text, (v if np.isfinite(v) else 0.0, yy), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=8)
        ax.set_yticks(rows)
        ax.set_yticklabels([n.removeprefix("routing/") for n in shown], fontsize=9)
        ax.set_ylim(max(len(shown), 4) - 0.5, -0.5)  # top down; bars keep their height with few metrics
        ax.set_xlim(min(0.0, min((s.metrics.get(n, 0.0) for s in summaries for n in shown), default=0.0)),
                    1.25 * span)
        ax.set_title(group.capitalize(), fontsize=11)
        ax.grid(axis="x", alpha=0.3)
        if hidden:
            ax.set_xlabel(f"+{len(hidden)} more in comparison.csv", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(n_runs, 5), fontsize=9)
    fig.suptitle("Final metrics (last logged value)")
    return _save(fig, Path(path))


def plot_routing_heatmaps(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    Expert usage by modality of every run side by side: one row per run (latest routing JSON), one
    panel per modality (layers x experts), one colour scale for all; runs without routing statistics
    are named under the figure.

    Returns:
        the PNG path, or ``None`` when no run has routing statistics.
    """
    from dex_monai.analysis.plots import plot_expert_usage_grid

    with_routing = [s for s in summaries if s.routing]
    if not with_routing:
        return None
    missing = [s.label for s in summaries if not s.routing]
    rows = {f"{s.label}\n(epoch {s.routing_epoch})": s.routing for s in with_routing}
    footnote = ("No routing statistics: " + ", ".join(missing)) if missing else None
    return plot_expert_usage_grid(
        rows, path, title="Expert usage by modality (latest epoch of each run)", footnote=footnote
    )
