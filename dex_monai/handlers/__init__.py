# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the DEX bundles, one topic per module."""

from dex_monai.handlers.classification import ClassificationReportHandler, ClassProbabilityWriter
from dex_monai.handlers.metrics_report import MetricsReportLabelHandler, label_metric_columns
from dex_monai.handlers.overlays import PredictionOverlayHandler, draw_overlays

__all__ = [
    "ClassProbabilityWriter",
    "ClassificationReportHandler",
    "MetricsReportLabelHandler",
    "PredictionOverlayHandler",
    "draw_overlays",
    "label_metric_columns",
]
