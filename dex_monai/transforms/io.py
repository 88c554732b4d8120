"""Loading any DEX image (DICOM series/file, NIfTI, PNG/JPEG/TIFF, NRRD, NPY, NPZ) through MONAI ``LoadImage``."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from dex_monai.data.readers import (
    DISPLAY_REFERRED,
    INTENSITY_RANGE,
    PIL_FORMATS,
    SOURCE_FORMAT,
    STORED_DTYPE,
    image_format,
    reader_for,
)

__all__ = ["LoadMultiModalImage", "LoadMultiModalImaged"]

_DISPLAY_8BIT = frozenset({"npz", "npy", "dicom"})


class LoadMultiModalImage(Transform):
    """Load one image with the reader its format needs (:func:`dex_monai.data.readers.reader_for`).

    Returns a ``float32`` :class:`~monai.data.MetaTensor` ``[C, *spatial]`` (``C`` = 1 grey, 3 colour),
    spatial axes in MONAI reader order (``x, y[, z]``). The metadata carry, besides the reader's,
    ``source_format``, ``stored_dtype``, ``intensity_range`` (stored integer range, when known)
    and ``display_referred`` (values are display grey levels: Pillow formats, 8-bit NPY/NPZ such as
    MedMNIST, 8-bit single DICOM objects).

    Errors name the file (and, for DICOM, the transfer syntax); nothing is silently skipped.
    """

    def __init__(self, dtype: Any = np.float32) -> None:
        self._loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=dtype)

    def __call__(
        self,
        filename: str | os.PathLike,
        series_uid: str | None = None,
        npz_key: str | None = None,
        npz_index: int | None = None,
    ) -> MetaTensor:
        fmt = image_format(filename)
        reader = reader_for(filename, series_uid=series_uid, npz_key=npz_key, npz_index=npz_index)
        img = self._loader(filename, reader=reader)
        meta = img.meta
        meta[SOURCE_FORMAT] = fmt
        stored = meta.get(STORED_DTYPE, "")
        # display grey levels: Pillow formats, and 8-bit arrays / single DICOM objects (MedMNIST, secondary
        # captures); 8-bit NIfTI/NRRD volumes or DICOM series keep their physical normalisation
        meta[DISPLAY_REFERRED] = bool(
            meta.get(DISPLAY_REFERRED, False) or fmt in PIL_FORMATS or (stored == "uint8" and fmt in _DISPLAY_8BIT)
        )
        if INTENSITY_RANGE in meta:
            meta[INTENSITY_RANGE] = [float(v) for v in np.asarray(meta[INTENSITY_RANGE]).ravel()[:2]]
        return img


class LoadMultiModalImaged(MapTransform):
    """Dictionary version of :class:`LoadMultiModalImage`.

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
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadMultiModalImage(dtype=dtype)
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
