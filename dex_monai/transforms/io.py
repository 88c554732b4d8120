"""Loading any DEX image (DICOM series/file, NIfTI, PNG/JPEG/TIFF, NRRD, NPY, NPZ) through MONAI ``LoadImage``."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from dex_monai.data.checks import RejectedFile, check_pixels, check_spatial_dims, classify_error
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

    With ``check`` (default) what cannot be used is refused with a
    :class:`~dex_monai.data.checks.RejectedFile` naming the file and the reason
    (:mod:`dex_monai.data.checks`): unreadable or truncated files, DICOM series with a gap or uneven slice spacing,
    more than three spatial dimensions (4-D NIfTI), no pixels, NaN/Inf values, and, unless ``constant_ok`` (label
    maps may be all background), constant images. Any other reader error is classified the same way, so every
    failure names the file; nothing is silently skipped.

    Args:
        dtype: data type of the output.
        check: run the checks above.
        constant_ok: accept constant images.
        label: the file is a label map: constant maps are accepted and palette pictures keep their indices.
    """

    def __init__(
        self, dtype: Any = np.float32, check: bool = True, constant_ok: bool = False, label: bool = False
    ) -> None:
        self._loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=dtype)
        self.check = check
        self.constant_ok = constant_ok or label
        self.label = label

    def __call__(
        self,
        filename: str | os.PathLike,
        series_uid: str | None = None,
        npz_key: str | None = None,
        npz_index: int | None = None,
    ) -> MetaTensor:
        fmt = image_format(filename)
        path = os.fspath(filename)
        if fmt not in ("dicom-series", None) and os.path.isfile(path) and os.path.getsize(path) == 0:
            raise RejectedFile("empty", "0 bytes", path)
        try:
            reader = reader_for(filename, series_uid=series_uid, npz_key=npz_key, npz_index=npz_index, label=self.label)
            img = self._loader(filename, reader=reader)
        except RejectedFile as e:
            raise e.with_path(path)
        except Exception as e:  # readers raise anything from EOFError to zlib errors: name the file and the reason
            raise classify_error(e, path) from e
        meta = img.meta
        if self.check:
            dims = np.asarray(meta.get("dim", [])).ravel()
            if fmt == "nifti" and dims.size > 4 and int(dims[0]) > 3:
                check_spatial_dims([int(v) for v in dims[1 : int(dims[0]) + 1]], path)
            check_spatial_dims(img.shape[1:], path)
            check_pixels(img, path, constant_ok=self.constant_ok)
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
