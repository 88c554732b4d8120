# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Analysis of trained DEX models: emergent modularity of the routing (array statistics in :mod:`.modularity`, figures in :mod:`.plots`)."""

from __future__ import annotations

from .modularity import (
    NMI_NORMALIZATIONS,
    LinearProbeResult,
    count_table_nmi,
    expert_usage,
    expert_usage_from_json,
    expert_usage_to_json,
    linear_probe_modality_accuracy,
    modality_expert_counts,
    modality_expert_nmi,
    normalized_entropy,
)
from .plots import plot_expert_usage_grid, plot_modality_expert_heatmaps

__all__ = [
    "LinearProbeResult",
    "NMI_NORMALIZATIONS",
    "count_table_nmi",
    "expert_usage",
    "expert_usage_from_json",
    "expert_usage_to_json",
    "linear_probe_modality_accuracy",
    "modality_expert_counts",
    "modality_expert_nmi",
    "normalized_entropy",
    "plot_expert_usage_grid",
    "plot_modality_expert_heatmaps",
]
