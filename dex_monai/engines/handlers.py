# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Where the DEX training handlers used to live, kept so that older configs and imports resolve. Each topic has its
own module in :mod:`dex_monai.handlers`: ``tracking`` (MLflow and the tracking queue), ``schedules``, ``progress``
and ``routing``."""

from dex_monai.handlers.progress import ProgressBarHandler, SamplerEpochHandler  # noqa: F401
from dex_monai.handlers.routing import RoutingStatsHandler, plot_usage, usage_to_json  # noqa: F401
from dex_monai.handlers.schedules import (  # noqa: F401
    CosineScheduleHandler,
    GEMAMomentumScheduleHandler,
    LossWeightScheduleHandler,
    RouterNoiseScheduleHandler,
)
from dex_monai.handlers.tracking import (  # noqa: F401
    TRACKING_ARTIFACTS,
    TRACKING_METRICS,
    DEXMLFlowHandler,
    add_tracking_artifact,
    add_tracking_metrics,
)
