"""3-D volumes -> 2-D slices along a chosen axis, keeping slices with enough foreground (non-air)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform

from dex_monai.data.slicing import (
    foreground_slices,
    slice_foreground_ratios,
    slice_volume,
)
from dex_monai.transforms.intensity import load_normalization_config, modality_settings

__all__ = [
    "slice_foreground_ratios",
    "foreground_slices",
    "slice_volume",
    "ExtractSlice",
    "ExtractSliced",
    "RandForegroundSliced",
]


def _slice_affine(affine: Any, axis: int) -> torch.Tensor:
    a = torch.as_tensor(affine, dtype=torch.float64)
    keep = [i for i in range(3) if i != axis]
    out = torch.eye(3, dtype=torch.float64)
    out[:2, :2] = a[keep][:, keep]
    out[:2, 2] = a[keep, 3]
    return out


class ExtractSlice(Transform):
    """Take slice ``index`` along spatial ``axis`` of ``[C, X, Y, Z]`` -> ``[C, *2-D]``.

    For a MetaTensor, the affine becomes the 2-D affine of the remaining axes and
    ``slice_index`` / ``slice_axis`` are recorded in the metadata.
    """

    def __init__(self, axis: int = 2) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}.")
        self.axis = axis

    def __call__(self, img: Any, index: int) -> Any:
        if img.ndim != 4:
            raise ValueError(f"ExtractSlice: expected [C, X, Y, Z], got shape {tuple(img.shape)}.")
        n = img.shape[self.axis + 1]
        if not -n <= index < n:
            raise IndexError(f"slice {index} out of range along axis {self.axis} ({n} slices).")
        out = img.select(self.axis + 1, int(index)) if isinstance(img, torch.Tensor) else np.take(img, index, self.axis + 1)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out.as_tensor().contiguous(), meta=dict(img.meta))
            out.affine = _slice_affine(img.affine, self.axis)
            out.meta["spatial_shape"] = np.asarray(out.shape[1:])
            out.meta["slice_index"] = int(index)
            out.meta["slice_axis"] = self.axis
        return out


class ExtractSliced(MapTransform):
    """Dictionary version of :class:`ExtractSlice`: the index is read from ``d[index_key]``.

    Items whose image is already 2-D pass unchanged; a 3-D image without an index is an error
    (use :class:`RandForegroundSliced` to draw one).
    """

    def __init__(
        self, keys: KeysCollection = "image", axis: int = 2, index_key: str = "slice_index", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.extractor = ExtractSlice(axis)
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 3:
                continue
            if d.get(self.index_key) is None:
                raise ValueError(f"ExtractSliced: '{key}' is 3-D but the item has no '{self.index_key}'.")
            d[key] = self.extractor(img, int(d[self.index_key]))
        return d


class RandForegroundSliced(RandomizableTransform, MapTransform):
    """Draw one slice of a 3-D image, uniformly among the slices with enough foreground.

    The thresholds come from the modality (``d[modality_key]``) settings in the normalisation config
    (CT, MR: ratio >= 0.05; PET: >= 0.01), unless ``min_ratio`` / ``threshold`` are given. If no slice
    qualifies, the slice with the most foreground is taken. If the item already has ``d[index_key]``
    that slice is taken; 2-D images pass unchanged. The chosen index is written to ``d[index_key]``.
    Expects normalised images (run after :class:`ModalityNormalized`).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        axis: int = 2,
        modality_key: str = "modality",
        index_key: str = "slice_index",
        config: Mapping[str, Any] | str | os.PathLike | None = None,
        min_ratio: float | None = None,
        threshold: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.extractor = ExtractSlice(axis)
        self.axis = axis
        self.modality_key = modality_key
        self.index_key = index_key
        self.config = config if isinstance(config, dict) and "modalities" in config else load_normalization_config(config)
        self.min_ratio = min_ratio
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 3:
                continue
            index = d.get(self.index_key)
            if index is None:
                settings = modality_settings(self.config, d[self.modality_key])
                thr = float(settings.get("foreground_threshold", 0.0)) if self.threshold is None else self.threshold
                min_ratio = float(settings.get("min_foreground_ratio", 0.0)) if self.min_ratio is None else self.min_ratio
                ratios = slice_foreground_ratios(img, self.axis, thr)
                good = np.nonzero(ratios >= min_ratio)[0] if min_ratio > 0 else np.arange(len(ratios))
                index = int(self.R.choice(good)) if len(good) else int(np.argmax(ratios))
                d[self.index_key] = index
            d[key] = self.extractor(img, int(index))
        return d


