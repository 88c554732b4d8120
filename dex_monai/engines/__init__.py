# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Training engines, checkpointing and schedules of DEX (used by the bundles under ``bundles/``); the handlers live in
:mod:`dex_monai.handlers` and are re-exported here for older configs."""

from dex_monai.engines.checkpoint import (
    CHECKPOINT_PREFIX,
    AtomicDiskSaver,
    CheckpointResumeHandler,
    ResumableCheckpointSaver,
    find_latest_checkpoint,
    list_checkpoints,
    save_network_weights,
)
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
from dex_monai.engines.inference import (
    FailureReportHandler,
    InferenceProgressHandler,
    TolerantEvaluator,
    exit_on_failures,
)
from dex_monai.engines.pretrain import DEXPretrainTrainer, PretrainKeys, output_scalars
from dex_monai.engines.schedules import (
    cosine_schedule,
    linear_scaled_lr,
    warmup_cosine_factor,
    warmup_cosine_lambda,
    warmup_cosine_scheduler,
)
from dex_monai.engines.utils import (
    bundle_config_snapshot,
    find_bundle_parser,
    get_rank,
    get_world_size,
    is_dist,
    is_rank0,
    load_pretrain_datalist,
    pretrain_dataset,
    unwrap_network,
)
from dex_monai.engines.unimed import UNIMED_LABEL_KINDS, PrepareUniMedBatch  # noqa: E402
