# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the DEX bundles, one topic per module: ``tracking`` (MLflow and the tracking queue),
``schedules``, ``progress``, ``routing`` (expert use), ``overlays``, ``classification``, ``metrics_report``."""

from dex_monai.handlers.classification import ClassificationReportHandler, ClassProbabilityWriter
from dex_monai.handlers.gm_coord import GMCoordHandler
from dex_monai.handlers.metrics_report import MetricsReportLabelHandler, label_metric_columns
from dex_monai.handlers.overlays import PredictionOverlayHandler, draw_overlays
from dex_monai.handlers.progress import ProgressBarHandler, SamplerEpochHandler
from dex_monai.handlers.routing import RoutingStatsHandler, plot_usage, usage_to_json
from dex_monai.handlers.schedules import (
    CosineScheduleHandler,
    GEMAMomentumScheduleHandler,
    LossWeightScheduleHandler,
    RouterNoiseScheduleHandler,
)
from dex_monai.handlers.tracking import (
    TRACKING_ARTIFACTS,
    TRACKING_METRICS,
    DEXMLFlowHandler,
    add_tracking_artifact,
    add_tracking_metrics,
)

__all__ = [
    "TRACKING_ARTIFACTS",
    "TRACKING_METRICS",
    "ClassProbabilityWriter",
    "ClassificationReportHandler",
    "CosineScheduleHandler",
    "DEXMLFlowHandler",
    "GMCoordHandler",
    "GEMAMomentumScheduleHandler",
    "LossWeightScheduleHandler",
    "MetricsReportLabelHandler",
    "PredictionOverlayHandler",
    "ProgressBarHandler",
    "RouterNoiseScheduleHandler",
    "RoutingStatsHandler",
    "SamplerEpochHandler",
    "add_tracking_artifact",
    "add_tracking_metrics",
    "draw_overlays",
    "label_metric_columns",
    "plot_usage",
    "usage_to_json",
]
from dex_monai.handlers.m4oe import M4oEStageHandler
__all__ += ["M4oEStageHandler"]
