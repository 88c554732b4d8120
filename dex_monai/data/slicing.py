# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Cutting normalised volumes into 2-D slices with enough foreground (array functions; the transforms are
:class:`dex_monai.transforms.ExtractSliced` and :class:`dex_monai.transforms.RandForegroundSliced`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dex_monai.data.normalization import load_normalization_config, modality_settings

__all__ = ["foreground_slices", "slice_foreground_ratios", "slice_volume"]


def _as_numpy(img: Any) -> np.ndarray:
    return img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)


def slice_foreground_ratios(volume: Any, axis: int = 2, threshold: float = 0.0) -> np.ndarray:
    """Foreground ratio of every slice of a normalised volume ``[C, X, Y, Z]`` along spatial ``axis``.

    A pixel is foreground when its value (mean over channels) is above ``threshold``.
    Returns ``float`` array of length ``volume.shape[axis + 1]``.
    """
    arr = _as_numpy(volume)
    if arr.ndim != 4:
        raise ValueError(f"expected a channel-first volume [C, X, Y, Z], got shape {arr.shape}.")
    grey = arr.mean(axis=0) if arr.shape[0] > 1 else arr[0]
    fg = grey > threshold
    other = tuple(a for a in range(3) if a != axis)
    return fg.mean(axis=other)


def foreground_slices(
    volume: Any,
    modality: str,
    axis: int = 2,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    min_ratio: float | None = None,
    threshold: float | None = None,
) -> list[int]:
    """Indices of the slices whose foreground ratio is at least ``min_ratio``.

    Defaults come from the modality's ``min_foreground_ratio`` (CT, MR 0.05; PET 0.01; others 0)
    and ``foreground_threshold`` in the normalisation config.
    """
    cfg = config if isinstance(config, dict) and "modalities" in config else load_normalization_config(config)
    settings = modality_settings(cfg, modality)
    min_ratio = float(settings.get("min_foreground_ratio", 0.0)) if min_ratio is None else float(min_ratio)
    threshold = float(settings.get("foreground_threshold", 0.0)) if threshold is None else float(threshold)
    ratios = slice_foreground_ratios(volume, axis=axis, threshold=threshold)
    if min_ratio <= 0:
        return list(range(len(ratios)))
    return [int(i) for i in np.nonzero(ratios >= min_ratio)[0]]


def slice_volume(
    volume: Any,
    modality: str,
    axis: int = 2,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
) -> list[tuple[int, np.ndarray]]:
    """All kept slices of a normalised ``[C, X, Y, Z]`` volume as ``[(index, float32 [C, *2-D])]``."""
    arr = _as_numpy(volume).astype(np.float32, copy=False)
    return [
        (i, np.ascontiguousarray(np.take(arr, i, axis + 1))) for i in foreground_slices(arr, modality, axis, config)
    ]
