# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Dictionary transforms of the fine-tuning bundles: singleton axes, label maps, and the inverse of the squeeze for
writing predictions with the input's shape on disk. (Channels and normalisation are pre-training's own transforms,
:class:`~dex_monai.transforms.EnsureChannelsd` and :class:`~dex_monai.transforms.ModalityNormalized`.)"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from dex_monai.data.readers import PATIENT_AFFINE

__all__ = ["SqueezeSpatiald", "PrepareLabeld", "restore_spatial_shape", "RestoreSpatialShaped"]


class SqueezeSpatiald(MapTransform):
    """
    Drop singleton spatial axes beyond ``spatial_dims`` (a 2D slice read as ``[C, H, W, 1]`` from NIfTI or DICOM
    becomes ``[C, H, W]``). The affine is left as read so that :class:`RestoreSpatialShaped` can give predictions the
    input's geometry back; more non-singleton axes than ``spatial_dims`` raise a ``ValueError``.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = int(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = list(img.shape[1:])
            while len(spatial) > self.spatial_dims and 1 in spatial:
                axis = len(spatial) - 1 - spatial[::-1].index(1)
                img = img.squeeze(axis + 1) if isinstance(img, torch.Tensor) else np.squeeze(img, axis + 1)
                spatial.pop(axis)
            if len(spatial) != self.spatial_dims:
                name = img.meta.get("filename_or_obj", key) if isinstance(img, MetaTensor) else key
                raise ValueError(f"{name}: spatial shape {tuple(img.shape[1:])} is not {self.spatial_dims}D.")
            d[key] = img
        return d


class PrepareLabeld(MapTransform):
    """
    Make a label map of class indices ``[1, *spatial]``: a colour mask keeps its first channel; with
    ``num_classes == 2`` every non-zero value is foreground (0/255 masks); otherwise values must already be class
    indices below ``num_classes`` (a ``ValueError`` names the file when not).
    """

    def __init__(self, keys: KeysCollection = "label", num_classes: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] > 1:
                label = label[:1]
            if self.num_classes == 2:
                label = (label > 0).to(torch.float32) if isinstance(label, torch.Tensor) else (label > 0).astype(np.float32)
            else:
                top = float(label.max())
                if top >= self.num_classes or float(label.min()) < 0:
                    name = label.meta.get("filename_or_obj", key) if isinstance(label, MetaTensor) else key
                    raise ValueError(f"label {name} has values outside [0, {self.num_classes - 1}] (max {top:g}).")
                label = torch.round(label) if isinstance(label, torch.Tensor) else np.round(label)
            d[key] = label
        return d


def restore_spatial_shape(pred: Any, ref_meta: Mapping) -> Any:
    """
    ``pred [C, *spatial]`` reshaped to the spatial shape the input had on disk (``ref_meta["spatial_shape"]``) when
    only singleton axes differ, with the input's ``original_affine``: the inverse of :class:`SqueezeSpatiald`. A 2D
    prediction of a single DICOM slice whose reader recorded its place in the patient (``patient_affine``) becomes
    ``[C, X, Y, 1]`` with that affine. Anything else is returned unchanged.
    """
    spatial = [int(s) for s in pred.shape[1:]]
    patient = ref_meta.get(PATIENT_AFFINE)
    if patient is not None and len(spatial) == 2:
        pred = pred.reshape(pred.shape[0], *spatial, 1)
        if isinstance(pred, MetaTensor):
            pred.affine = torch.as_tensor(np.asarray(patient), dtype=torch.float64)
        return pred
    original = ref_meta.get("spatial_shape")
    if original is None:
        return pred
    original = [int(s) for s in np.asarray(original).ravel()]
    if spatial == original or [s for s in spatial if s != 1] != [s for s in original if s != 1]:
        return pred
    pred = pred.reshape(pred.shape[0], *original)
    if isinstance(pred, MetaTensor) and ref_meta.get("original_affine") is not None:
        pred.affine = torch.as_tensor(np.asarray(ref_meta["original_affine"]), dtype=torch.float64)
    return pred


class RestoreSpatialShaped(MapTransform):
    """Dictionary transform applying :func:`restore_spatial_shape` with the metadata of ``ref_key``."""

    def __init__(self, keys: KeysCollection = "pred", ref_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        for key in self.key_iterator(d):
            d[key] = restore_spatial_shape(d[key], meta)
        return d
