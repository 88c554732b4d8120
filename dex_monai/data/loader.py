# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Checked loading of one image (the reader layer's entry point): the reader its format needs, then the checks of
:mod:`dex_monai.data.checks`. The dictionary transform of the bundles is :class:`dex_monai.transforms.LoadMultiModalImaged`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage, Transform

from dex_monai.data.checks import (
    RejectedFile,
    check_pixels,
    check_spatial_dims,
    classify_error,
)
from dex_monai.data.readers import (
    DISPLAY_REFERRED,
    INTENSITY_RANGE,
    PIL_FORMATS,
    SOURCE_FORMAT,
    STORED_DTYPE,
    image_format,
    reader_for,
)

__all__ = ["LoadMultiModalImage"]


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
