# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Where the fine-tuning pieces used to live, kept so that configs written for earlier versions still resolve. Each piece
has one home now:

- initialisation from a checkpoint: :mod:`dex_monai.engines.initialise`;
- datalists and output paths: :mod:`dex_monai.data.datalist`;
- transforms: :mod:`dex_monai.transforms.downstream` and :mod:`dex_monai.transforms.save`; the channel and intensity
  rules are pre-training's (``NormalizeModalityd`` is :class:`dex_monai.transforms.ModalityNormalized`);
- the metadata-free inferer: :mod:`dex_monai.inferers`; batch plumbing: :mod:`dex_monai.engines.batch`;
- overlays, classification report and probabilities: :mod:`dex_monai.handlers`.
"""

from dex_monai.data.datalist import (  # noqa: F401
    classification_datalist,
    inference_datalist,
    plan_outputs,
    prediction_ext,
    segmentation_datalist,
    split_items,
)
from dex_monai.engines.batch import prepare_tensor_batch, stack_pred_label  # noqa: F401
from dex_monai.engines.initialise import INIT_MODES, initialise_network, resolve_checkpoint  # noqa: F401
from dex_monai.handlers.classification import ClassificationReportHandler, ClassProbabilityWriter  # noqa: F401
from dex_monai.handlers.overlays import PredictionOverlayHandler, draw_overlays  # noqa: F401
from dex_monai.inferers import TensorInferer  # noqa: F401
from dex_monai.transforms.downstream import (  # noqa: F401
    PrepareLabeld,
    RestoreSpatialShaped,
    SqueezeSpatiald,
    restore_spatial_shape,
)
from dex_monai.transforms.intensity import EnsureChannelsd  # noqa: F401
from dex_monai.transforms.intensity import ModalityNormalized as NormalizeModalityd  # noqa: F401
from dex_monai.transforms.save import SavePredictiond  # noqa: F401
