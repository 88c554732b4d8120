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

from dex_monai.tracking.report import RunSummary


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


def plot_final_metrics(summaries: Sequence[RunSummary], path: str | os.PathLike) -> Path | None:
    """
    One bar chart per metric (final value), one bar per run.

    Returns:
        the PNG path, or ``None`` when no run logged a metric.
    """
    names = sorted({k for s in summaries for k in s.metrics})
    if not names:
        return None
    width = max(3.2, 0.6 * len(summaries) + 1.5)
    fig, axes = _grid_figure(len(names), 4, (width, 3.0))
    positions = np.arange(len(summaries))
    for ax, name in zip(axes, names):
        values = [s.metrics.get(name, np.nan) for s in summaries]
        ax.bar(positions, values, color=[_colour(i) for i in range(len(summaries))])
        for x, v in zip(positions, values):
            if np.isfinite(v):
                ax.annotate(f"{v:.4g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(positions)
        ax.set_xticklabels([s.label for s in summaries], rotation=30, ha="right", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
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
