"""Per-modality normalisation (:class:`ModalityNormalized`) and channels (:class:`EnsureChannels`, luma for colour ->
grey) as MONAI transforms, for pre-training and the fine-tuning bundles alike. The rules themselves, the paper's table
and the config live in :mod:`dex_monai.data.normalization` (re-exported here)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from dex_monai.data.modality import UnknownModalityError
from dex_monai.data.normalization import (
    DEFAULT_NORMALIZATION,
    NORMALIZATION_METHODS,
    PLAIN_METHODS,
    ModalityNormalize,
    default_normalization_config,
    load_normalization_config,
    modality_settings,
    normalization_config_hash,
    normalize_intensity,
)

__all__ = [
    "DEFAULT_NORMALIZATION",
    "NORMALIZATION_METHODS",
    "default_normalization_config",
    "load_normalization_config",
    "normalization_config_hash",
    "modality_settings",
    "normalize_intensity",
    "ModalityNormalize",
    "ModalityNormalized",
    "PLAIN_METHODS",
    "EnsureChannels",
    "EnsureChannelsd",
    "EnsureThreeChannel",
    "EnsureThreeChanneld",
    "EnsureSingleChannel",
    "EnsureSingleChanneld",
]


class ModalityNormalized(MapTransform):
    """Dictionary version of :class:`ModalityNormalize`, for pre-training and the fine-tuning bundles alike.

    The modality is the item's ``d[modality_key]``, else ``modality`` (fixed by a bundle; a rule of
    :data:`PLAIN_METHODS` may stand in for it). A PET item is treated as SUV when ``d[units_key]`` is
    ``"SUV"``/``"GML"``, ``d["suv"]`` is true, or the DICOM ``Units`` tag says ``GML``. With ``mean`` and ``std`` the
    result is then standardised per channel, ``(x - mean) / std`` (e.g. the ImageNet statistics of 2D pre-training).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        units_key: str = "units",
        modality: str | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = ModalityNormalize(config)
        self.modality_key = modality_key
        self.units_key = units_key
        self.modality = modality
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    def _standardise(self, img: Any) -> Any:
        if self.mean is None or self.std is None:
            return img
        shape = (-1,) + (1,) * (img.ndim - 1)
        mean, std = self.mean.reshape(shape if self.mean.numel() > 1 else ()), self.std.reshape(
            shape if self.std.numel() > 1 else ())
        if isinstance(img, torch.Tensor):
            return (img - mean.to(img.device)) / std.to(img.device)
        return (img - mean.numpy()) / std.numpy()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get(self.modality_key) or self.modality
        if modality is None:
            raise UnknownModalityError(
                f"ModalityNormalized: the item has no '{self.modality_key}' and no `modality` is set "
                "(run DetectModalityd first, or fix the modality)."
            )
        suv: bool | None = None
        if str(d.get(self.units_key, "")).upper() in ("SUV", "GML") or bool(d.get("suv", False)):
            suv = True
        for key in self.key_iterator(d):
            d[key] = self._standardise(self.normalizer(d[key], str(modality), suv=suv))
        return d


_LUMA = (0.299, 0.587, 0.114)


class EnsureChannels(Transform):
    """``[C, *spatial]`` -> ``[channels, *spatial]``, the one channel rule of pre-training and fine-tuning: an alpha
    channel is dropped (4 -> 3, 2 -> 1), grey is repeated, colour becomes grey as luma (0.299 R + 0.587 G + 0.114 B).
    Other channel counts are an error."""

    def __init__(self, channels: int = 3) -> None:
        self.channels = int(channels)

    def __call__(self, img: Any) -> Any:
        c = int(img.shape[0])
        if c in (2, 4):
            img, c = img[: c - 1], c - 1
        if c == self.channels:
            return img
        if c == 1:
            return img.repeat(self.channels, *([1] * (img.ndim - 1))) if isinstance(img, torch.Tensor) else np.repeat(
                img, self.channels, 0)
        if c == 3 and self.channels == 1:
            return img[0:1] * _LUMA[0] + img[1:2] * _LUMA[1] + img[2:3] * _LUMA[2]
        raise ValueError(
            f"{type(self).__name__}: cannot turn {int(img.shape[0])} channels into {self.channels} (shape {tuple(img.shape)})."
        )


class EnsureChannelsd(MapTransform):
    """Dictionary version of :class:`EnsureChannels`."""

    def __init__(self, keys: KeysCollection = "image", channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureChannels(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class EnsureThreeChannel(EnsureChannels):
    """:class:`EnsureChannels` to 3 channels (2-D pre-training): grey repeated, RGB kept, alpha dropped."""

    def __init__(self) -> None:
        super().__init__(3)


class EnsureThreeChanneld(EnsureChannelsd):
    """Dictionary version of :class:`EnsureThreeChannel`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, 3, allow_missing_keys)


class EnsureSingleChannel(EnsureChannels):
    """:class:`EnsureChannels` to 1 channel (3-D pre-training): grey kept, alpha dropped, RGB -> luma."""

    def __init__(self) -> None:
        super().__init__(1)


class EnsureSingleChanneld(EnsureChannelsd):
    """Dictionary version of :class:`EnsureSingleChannel`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, 1, allow_missing_keys)
