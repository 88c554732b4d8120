# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the DEX bundles, one topic per module."""

from dex_monai.handlers.metrics_report import MetricsReportLabelHandler, label_metric_columns

__all__ = ["MetricsReportLabelHandler", "label_metric_columns"]
