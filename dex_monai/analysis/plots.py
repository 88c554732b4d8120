# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Figures of routing modularity: expert use per modality as heatmaps (layers x experts), one grid per model or one
row per run."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from dex_monai.analysis.modularity import ArrayLike, _pad_usage

__all__ = ["plot_expert_usage_grid", "plot_modality_expert_heatmaps"]


def _save_figure(fig: Any, path: Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


_Panel = tuple[str, Union[np.ndarray, None]]


def _draw_heatmap_grid(
    cells: list[list[_Panel | None]],
    row_labels: list[str],
    path: Path,
    title: str | None,
    vmax: float | None,
    annotate: bool | None,
    footnote: str | None,
    dpi: int,
) -> Path:
    """
    Draws a grid of ``layers x experts`` heatmaps with one shared colour scale.

    Args:
        cells: rows of panels; a panel is ``(title, [L, E] array)``, ``(title, None)`` for an empty
            panel marked "n/a", or ``None`` for an unused slot (hidden).
        row_labels: label put in front of the y-axis label of each row ("" for none).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    arrays = [p[1] for row in cells for p in row if p is not None and p[1] is not None]
    n_layers = max((a.shape[0] for a in arrays), default=1)
    n_experts = max((a.shape[1] for a in arrays), default=1)
    finite = [a[np.isfinite(a)] for a in arrays]
    top = max((float(f.max()) for f in finite if f.size), default=0.0) if vmax is None else float(vmax)
    if not top > 0:
        top = 1.0
    if annotate is None:
        annotate = n_layers * n_experts <= 64

    n_rows, n_cols = len(cells), max(len(row) for row in cells)
    cell = float(np.clip(4.0 / max(n_layers, n_experts), 0.1, 0.35))
    panel_w = max(1.6, cell * n_experts) + 0.7
    panel_h = max(1.2, cell * n_layers) + 0.7
    fig = Figure(
        figsize=(n_cols * panel_w + 1.0, n_rows * panel_h + (0.5 if title else 0.2) + (0.4 if footnote else 0.0)),
        layout="constrained",
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin=0.0, vmax=top)
    size = 8 if n_cols <= 6 else 7
    step_x = max(1, int(math.ceil(n_experts / 16)))
    step_y = max(1, int(math.ceil(n_layers / 16)))

    used = []
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i, j]
            panel = cells[i][j] if j < len(cells[i]) else None
            if panel is None:
                ax.set_visible(False)
                continue
            used.append(ax)
            name, arr = panel
            ax.set_title(name, fontsize=size + 1)
            if arr is None:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="grey")
            else:
                full = np.full((n_layers, n_experts), np.nan)
                full[: arr.shape[0], : arr.shape[1]] = arr
                ax.imshow(np.ma.masked_invalid(full), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
                ax.set_xticks(range(0, n_experts, step_x))
                ax.set_yticks(range(0, n_layers, step_y))
                ax.tick_params(labelsize=size - 1, length=2)
                if annotate:
                    for (y, x), v in np.ndenumerate(full):
                        if np.isfinite(v):
                            colour = "black" if v > 0.6 * top else "white"
                            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6, color=colour)
            below = cells[i + 1][j] if i + 1 < n_rows and j < len(cells[i + 1]) else None
            if below is None:
                ax.set_xlabel("expert", fontsize=size)
            if j == 0:
                ax.set_ylabel(f"{row_labels[i]}\nlayer" if row_labels[i] else "layer", fontsize=size)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), shrink=0.9, label="selection fraction",
                 fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=size + 3)
    if footnote:
        fig.supxlabel(footnote, fontsize=size)
    return _save_figure(fig, path, dpi)


def plot_expert_usage_grid(
    rows: Mapping[str, Mapping[Hashable, ArrayLike]],
    path: str | Path,
    title: str | None = None,
    modalities: Sequence[Hashable] | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    footnote: str | None = None,
    dpi: int = 100,
) -> Path:
    """
    Grid of expert-usage heatmaps: one row per entry of ``rows`` (e.g. one per MLflow run), one column
    per modality, every panel ``layers x experts``, one colour scale shared by all panels.

    Args:
        rows: ``{row label: {modality: [L, E] usage}}``; a modality missing from a row gives an empty
            panel marked "n/a".  Values may be arrays, tensors or ragged per-layer lists.
        path: PNG file to write (parent folders are created).
        title: figure title.
        modalities: column order; default the modalities in order of first appearance.
        vmax: top of the shared colour scale (bottom is 0); default the largest finite value
            (1.0 when there is none).  Pass ``1.0`` to compare figures of different epochs.
        annotate: write the value in every cell; default only for small panels (<= 64 cells).
        footnote: text under the panels (e.g. the runs that have no statistics).
        dpi: resolution of the PNG.

    Returns:
        the path of the PNG.
    """
    grid = {str(r): {str(k): _pad_usage(v) for k, v in panels.items()} for r, panels in rows.items()}
    if modalities is None:
        cols: list[str] = []
        for panels in grid.values():
            cols += [m for m in panels if m not in cols]
    else:
        cols = [str(m) for m in modalities]
    if not grid or not cols:
        raise ValueError("nothing to plot: no rows or no modalities.")
    cells: list[list[_Panel | None]] = [[(m, panels.get(m)) for m in cols] for panels in grid.values()]
    return _draw_heatmap_grid(cells, list(grid), Path(path), title, vmax, annotate, footnote, dpi)


def plot_modality_expert_heatmaps(
    usage: Mapping[Hashable, ArrayLike],
    path: str | Path,
    title: str | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    max_columns: int = 6,
    dpi: int = 100,
) -> Path:
    """
    Expert usage of one model: one heatmap panel per modality (layers on the vertical axis, experts on
    the horizontal one), one colour scale shared by all panels, written as a PNG.

    This is the figure behind the ``routing/expert_usage_epoch_<N>.png`` artifact of the pre-training
    bundle.  Layers with fewer experts than the widest one (NaN cells of :func:`expert_usage`) are
    drawn as grey masked cells; beyond ``max_columns`` modalities the panels wrap onto more rows.

    Args:
        usage: ``{modality: [L, E] usage}`` (arrays, tensors or ragged per-layer lists), e.g. from
            :func:`expert_usage` or :func:`expert_usage_from_json`.
        path: PNG file to write (parent folders are created).
        title: figure title, e.g. ``"expert usage, epoch 3"``.
        vmax: top of the colour scale (bottom 0); default the largest value.
        annotate: print values in the cells; default only for small panels (<= 64 cells).
        max_columns: panels per row before wrapping.
        dpi: resolution of the PNG.

    Returns:
        the path of the PNG.
    """
    if not usage:
        raise ValueError("usage is empty: no modality to plot.")
    items: list[_Panel] = [(str(k), _pad_usage(v)) for k, v in usage.items()]
    ncols = max(1, min(int(max_columns), len(items)))
    cells: list[list[_Panel | None]] = [list(items[i : i + ncols]) for i in range(0, len(items), ncols)]
    cells[-1] += [None] * (ncols - len(cells[-1]))
    return _draw_heatmap_grid(cells, [""] * len(cells), Path(path), title, vmax, annotate, None, dpi)
