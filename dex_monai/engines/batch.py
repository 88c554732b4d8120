# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Engine plumbing of the fine-tuning bundles: plain-tensor batches for the network, and (prediction, label) pairs
for classification metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor

__all__ = ["prepare_tensor_batch", "stack_pred_label"]


def prepare_tensor_batch(batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """
    MONAI's ``default_prepare_batch`` returning plain tensors: the network gets no ``MetaTensor`` (DEX routing
    regroups the batch by expert, which batched metadata cannot follow, and metadata costs time in the hot loop),
    while the batch itself keeps its metadata for the postprocessing (``Invertd``, writers, overlays). Use as the
    ``prepare_batch`` of MONAI trainers and evaluators.
    """
    from monai.engines.utils import default_prepare_batch

    prepared = default_prepare_batch(batchdata, device, non_blocking, **kwargs)

    def plain(x: Any) -> Any:
        return x.as_tensor() if isinstance(x, MetaTensor) else x

    return tuple(plain(x) for x in prepared) if isinstance(prepared, tuple) else plain(prepared)


def stack_pred_label(output: Any, num_classes: int | None = None, pred_key: str = "pred", label_key: str = "label"):
    """
    ``(pred [B, C], label)`` from an engine output (a decollated list of dicts or a batch dict), for classification
    metrics: ``label`` is ``[B]`` class indices, or one-hot ``[B, num_classes]`` when ``num_classes`` is given
    (MONAI ``ROCAUC``).
    """
    if isinstance(output, Mapping):
        pred, label = output[pred_key], output[label_key]
    else:
        pred = torch.stack([torch.as_tensor(o[pred_key]) for o in output])
        label = torch.stack([torch.as_tensor(o[label_key]).reshape(-1)[:1] for o in output])
    pred = torch.as_tensor(pred).float().reshape(len(pred), -1)
    label = torch.as_tensor(label).reshape(-1).long()
    if num_classes:
        label = F.one_hot(label, int(num_classes)).to(pred.dtype)
    return pred, label
