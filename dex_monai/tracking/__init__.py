# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Comparing MLflow runs: the store (:mod:`.store`), which runs (:mod:`.selection`), what is said about them
(:mod:`.report`), the figures (:mod:`.plots`) and the whole comparison with its command line (:mod:`.compare`,
``python -m dex_monai.compare``); and what a training run records in MLflow besides metrics: its datalists as dataset
inputs (:mod:`.inputs`) and its network as a logged model (:mod:`.models`)."""

from dex_monai.tracking.compare import ComparisonResult, compare_runs, main
from dex_monai.tracking.plots import (
    plot_final_metrics,
    plot_loss_curves,
    plot_routing_heatmaps,
)
from dex_monai.tracking.report import (
    RunSummary,
    build_tables,
    collect_runs,
    format_text_tables,
)
from dex_monai.tracking.selection import parse_tags, select_runs
from dex_monai.tracking.store import (
    COMPARED_RUN_IDS_TAG,
    COMPARISON_TAG,
    DEFAULT_COMPARISON_EXPERIMENT,
    DEFAULT_OUT_DIR,
    ComparisonError,
    connect,
    resolve_tracking_uri,
)

__all__ = [
    "COMPARISON_TAG",
    "COMPARED_RUN_IDS_TAG",
    "ComparisonError",
    "ComparisonResult",
    "DEFAULT_COMPARISON_EXPERIMENT",
    "DEFAULT_OUT_DIR",
    "RunSummary",
    "build_tables",
    "collect_runs",
    "compare_runs",
    "connect",
    "format_text_tables",
    "main",
    "parse_tags",
    "plot_final_metrics",
    "plot_loss_curves",
    "plot_routing_heatmaps",
    "resolve_tracking_uri",
    "select_runs",
]
