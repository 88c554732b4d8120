"""Loading any DEX image (DICOM series/file, NIfTI, PNG/JPEG/TIFF, NRRD, NPY, NPZ) through MONAI ``LoadImage``."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from dex_monai.data.loader import LoadMultiModalImage
from dex_monai.data.readers import (
    image_format,
)

__all__ = ["LoadMultiModalImage", "LoadMultiModalImaged"]


class LoadMultiModalImaged(MapTransform):
    """Dictionary version of :class:`LoadMultiModalImage` (the loading transform of every bundle).

    Label maps are loaded by a second instance with ``label=True`` (an all-background mask is valid, palette masks
    keep their class indices).

    The item gives the path in ``key``; optional item entries choose inside the file:
    ``series_uid`` (a DICOM series of a folder), ``npz_key`` and ``npz_index`` (one image of a
    MedMNIST-style stack). Output ``d[key]``: MetaTensor ``[C, *spatial]`` float32.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        series_uid_key: str = "series_uid",
        npz_key_key: str = "npz_key",
        npz_index_key: str = "npz_index",
        dtype: Any = np.float32,
        check: bool = True,
        constant_ok: bool = False,
        label: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMultiModalImage(dtype=dtype, check=check, constant_ok=constant_ok, label=label)
        self.series_uid_key = series_uid_key
        self.npz_key_key = npz_key_key
        self.npz_index_key = npz_index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, (str, os.PathLike)):
                continue  # already loaded
            index = d.get(self.npz_index_key)
            if (
                image_format(value) == "npz"
                and index is None
                and d.get("num_images", 1) not in (None, 1)
            ):
                raise ValueError(
                    f"{value}: the entry is a stack of {d.get('num_images')} images ('{d.get(self.npz_key_key)}'); "
                    "expand it into one item per image first (dex_monai.data.expand_datalist)."
                )
            d[key] = self.loader(
                value,
                series_uid=d.get(self.series_uid_key),
                npz_key=d.get(self.npz_key_key),
                npz_index=None if index is None else int(index),
            )
        return d
