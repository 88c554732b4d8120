"""Ready-made 2-D and 3-D pre-training pipelines (MONAI ``Compose``) from a datalist item."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep

from dex_monai.data.modality import ModalityRules
from dex_monai.transforms.crop import RandResizedCropd
from dex_monai.transforms.intensity import (
    EnsureSingleChanneld,
    EnsureThreeChanneld,
    ModalityNormalized,
)
from dex_monai.transforms.io import LoadMultiModalImaged
from dex_monai.transforms.modality import DetectModalityd
from dex_monai.transforms.slicing import RandForegroundSliced

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "pretrain_2d_load_transforms",
    "pretrain_2d_augment_transforms",
    "pretrain_2d_transforms",
    "pretrain_3d_transforms",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_OUTPUT_KEYS = ("image", "modality", "modality_index")

Rules = ModalityRules | str | os.PathLike | Sequence[Any] | Mapping[str, str] | None


def pretrain_2d_load_transforms(
    keys: str = "image",
    modality_key: str = "modality",
    norm_config: str | os.PathLike | Mapping[str, Any] | None = None,
    rules: Rules = None,
    slice_axis: int = 2,
    strict_modality: bool = True,
) -> Compose:
    """Deterministic part of the 2-D pipeline except slice choice: item -> normalised ``[C, *spatial]`` in ``[0, 1]``.

    Load (:class:`LoadMultiModalImaged`) -> modality (:class:`DetectModalityd`) -> per-modality
    normalisation of the whole image/volume (:class:`ModalityNormalized`) -> one slice
    (:class:`RandForegroundSliced`: the item's ``slice_index``, else a random foreground slice).
    """
    return Compose(
        [
            LoadMultiModalImaged(keys),
            DetectModalityd(keys, modality_key=modality_key, rules=rules, strict=strict_modality),
            ModalityNormalized(keys, modality_key=modality_key, config=norm_config),
            RandForegroundSliced(keys, axis=slice_axis, modality_key=modality_key, config=norm_config),
        ]
    )


def pretrain_2d_augment_transforms(
    img_size: int | Sequence[int] = 64,
    keys: str = "image",
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    min_mean: float = 0.05,
    flip_prob: float = 0.5,
    rotate_degrees: float = 15.0,
    affine_prob: float = 0.5,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    output_keys: Sequence[str] | None = _OUTPUT_KEYS,
) -> Compose:
    """Random part of the 2-D pipeline: normalised ``[C, S0, S1]`` in ``[0, 1]`` -> ``[3, H, W]`` float32.

    3 channels (:class:`EnsureThreeChanneld`) -> random resized crop rejecting near-black crops
    (:class:`RandResizedCropd`) -> horizontal flip -> small rotation -> ImageNet mean/std (last).
    ``output_keys`` (``None``: all) are kept in the output item.
    """
    size = tuple(int(s) for s in ensure_tuple_rep(img_size, 2))
    xforms: list[Any] = [
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),  # plain tensors: faster
        EnsureThreeChanneld(keys),
        RandResizedCropd(keys, size=size, scale=scale, ratio=ratio, min_mean=min_mean),
        RandFlipd(keys, prob=flip_prob, spatial_axis=0),
    ]
    if affine_prob > 0 and rotate_degrees > 0:
        xforms.append(
            RandAffined(
                keys,
                prob=affine_prob,
                rotate_range=(math.radians(rotate_degrees),),
                padding_mode="zeros",
                mode="bilinear",
            )
        )
    if mean is not None and std is not None:
        xforms.append(
            NormalizeIntensityd(
                keys,
                subtrahend=torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                divisor=torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
            )
        )
    xforms.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    if output_keys is not None:
        xforms.append(SelectItemsd(list(output_keys), allow_missing_keys=True))
    return Compose(xforms)


def pretrain_2d_transforms(
    img_size: int | Sequence[int] = 64,
    keys: str = "image",
    modality_key: str = "modality",
    norm_config: str | os.PathLike | Mapping[str, Any] | None = None,
    rules: Rules = None,
    slice_axis: int = 2,
    strict_modality: bool = True,
    **augment: Any,
) -> Compose:
    """Full 2-D pre-training pipeline: datalist item (image path + modality) -> ``[3, H, W]`` float32.

    The output item keeps ``image`` (normalised with ImageNet mean/std), ``modality`` (str) and
    ``modality_index`` (int, position in :data:`~dex_monai.data.MODALITIES`). A 3-D item gives one
    random foreground slice (or its ``slice_index``); a MedMNIST stack must be expanded to one item
    per image first (:func:`~dex_monai.data.expand_datalist`). ``augment`` goes to
    :func:`pretrain_2d_augment_transforms` (``scale``, ``ratio``, ``min_mean``, ``flip_prob``...).

    Example::

        xform = pretrain_2d_transforms(img_size=64)
        out = xform({"image": "ct.nii.gz", "modality": "CT"})
        out["image"].shape  # torch.Size([3, 64, 64])
    """
    load = pretrain_2d_load_transforms(keys, modality_key, norm_config, rules, slice_axis, strict_modality)
    aug = pretrain_2d_augment_transforms(img_size, keys, **augment)
    return Compose([*load.transforms, *aug.transforms])


def _above(threshold: float, x: torch.Tensor) -> torch.Tensor:
    return x > threshold


def pretrain_3d_transforms(
    roi_size: int | Sequence[int] = 64,
    keys: str = "image",
    modality_key: str = "modality",
    norm_config: str | os.PathLike | Mapping[str, Any] | None = None,
    rules: Rules = None,
    num_samples: int = 1,
    pixdim: Sequence[float] | None = None,
    foreground_threshold: float = 0.0,
    flip_prob: float = 0.5,
    mean_std: tuple[float, float] | None = None,
    strict_modality: bool = True,
    output_keys: Sequence[str] | None = _OUTPUT_KEYS,
) -> Compose:
    """3-D pre-training pipeline: volume item -> ``[1, *roi_size]`` float32 patch(es) in ``[0, 1]``.

    Load -> modality -> per-modality normalisation -> 1 channel -> optional resampling to ``pixdim``
    -> crop to the foreground box (values above ``foreground_threshold``) -> pad to ``roi_size`` ->
    random ``roi_size`` patch (``num_samples > 1``: a list of patches) -> random flips on the 3 axes ->
    optional ``(mean, std)`` standardisation.
    """
    roi = tuple(int(s) for s in ensure_tuple_rep(roi_size, 3))
    xforms: list[Any] = [
        LoadMultiModalImaged(keys),
        DetectModalityd(keys, modality_key=modality_key, rules=rules, strict=strict_modality),
        ModalityNormalized(keys, modality_key=modality_key, config=norm_config),
        EnsureSingleChanneld(keys),
    ]
    if pixdim is not None:
        xforms.append(Spacingd(keys, pixdim=tuple(pixdim), mode="bilinear"))
    xforms += [
        CropForegroundd(keys, source_key=keys, select_fn=partial(_above, foreground_threshold), allow_smaller=True),
        SpatialPadd(keys, spatial_size=roi),
    ]
    if num_samples > 1:
        xforms.append(RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=num_samples, random_size=False))
    else:
        xforms.append(RandSpatialCropd(keys, roi_size=roi, random_size=False))
    xforms += [RandFlipd(keys, prob=flip_prob, spatial_axis=a) for a in range(3)]
    if mean_std is not None:
        xforms.append(NormalizeIntensityd(keys, subtrahend=float(mean_std[0]), divisor=float(mean_std[1])))
    xforms.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    if output_keys is not None:
        xforms.append(SelectItemsd(list(output_keys), allow_missing_keys=True))
    return Compose(xforms)
