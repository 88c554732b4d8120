# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""What an image file is: formats by name (and DICOM by its magic), the metadata keys every reader records, and
the small pieces the readers share. No pixels are read here."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from monai.utils import MetaKeys

__all__ = [
    "STORED_DTYPE",
    "INTENSITY_RANGE",
    "SOURCE_FORMAT",
    "DISPLAY_REFERRED",
    "DICOM_MODALITY",
    "DICOM_UNITS",
    "PATIENT_AFFINE",
    "PIL_FORMATS",
    "IMAGE_SUFFIXES",
    "image_format",
    "image_stem",
    "is_dicom_file",
    "is_dicom_series_folder",
    "dicom_files_in",
    "is_colour_last",
]

STORED_DTYPE = "stored_dtype"  #: meta key: numpy dtype name of the data as stored in the file
INTENSITY_RANGE = "intensity_range"  #: meta key: ``[lo, hi]`` of the stored integer range
SOURCE_FORMAT = "source_format"  #: meta key: :func:`image_format` of the file
DISPLAY_REFERRED = "display_referred"  #: meta key: the values are display grey levels, not physical units
DICOM_MODALITY = "dicom_modality"  #: meta key: DICOM ``Modality`` tag
DICOM_UNITS = "units"  #: meta key: DICOM ``Units`` (0054,1001), e.g. ``GML`` for SUV-scaled PET
PATIENT_AFFINE = "patient_affine"  #: meta key: RAS affine of a single DICOM slice as ``[X, Y, 1]`` (patient space)
#: formats read with Pillow: their values are display grey levels / colours.
PIL_FORMATS = frozenset({"png", "jpeg", "tiff", "bmp"})
_ITK_FORMATS = frozenset({"nrrd", "metaimage"})
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_SUFFIX_FORMAT = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".npy": "npy",
    ".npz": "npz",
}
#: every file ending read as an image (DICOM files may also have no suffix at all)
IMAGE_SUFFIXES = tuple(sorted({*_SUFFIX_FORMAT, *_DICOM_SUFFIXES}, key=len, reverse=True))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a DICOM suffix (``.dcm``, ``.dicom``, ``.ima``), or another
    existing file (no suffix, UID-like names such as ``1.2.840.1234``) with the ``DICM`` magic at byte 128."""
    name = os.fspath(path).lower()
    if name.endswith(_DICOM_SUFFIXES):
        return True
    if any(name.endswith(suffix) for suffix in _SUFFIX_FORMAT):
        return False
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                f.seek(128)
                return f.read(4) == b"DICM"
        except OSError:
            return False
    return False


def image_format(path: str | os.PathLike) -> str | None:
    """The format of ``path``: ``dicom-series`` (a folder), ``dicom``, ``nifti``, ``png``, ``jpeg``, ``tiff``,
    ``bmp``, ``nrrd``, ``metaimage``, ``npy``, ``npz``; ``None`` when unsupported."""
    if os.path.isdir(path):
        return "dicom-series"
    name = os.fspath(path).lower()
    for suffix, fmt in _SUFFIX_FORMAT.items():
        if name.endswith(suffix):
            return fmt
    return "dicom" if is_dicom_file(path) else None


def image_stem(name: str | os.PathLike) -> str:
    """A file name without its image suffix (``a.nii.gz`` -> ``a``; a suffix-less DICOM name is kept)."""
    name = os.path.basename(os.fspath(name).rstrip("/\\"))
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_series_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding DICOM files directly (read as one series, see :class:`DicomSeriesReader`)."""
    if not os.path.isdir(path) or os.path.basename(os.fspath(path).rstrip("/\\")).startswith("."):
        return False
    try:
        entries = [e for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")]
    except OSError:
        return False
    return any(is_dicom_file(e.path) for e in entries)


def dicom_files_in(folder: str | os.PathLike) -> list[str]:
    """The DICOM files directly inside ``folder`` (not recursive), sorted by name."""
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith(".") and is_dicom_file(entry.path):
            out.append(entry.path)
    return out


def is_colour_last(shape: Sequence[int]) -> bool:
    """Whether an image array ``[H, W, C]`` is 2-D colour (``C`` in 3, 4, smaller than H and W) rather than 3-D."""
    return len(shape) == 3 and shape[-1] in (3, 4) and min(shape[0], shape[1]) > shape[-1]


def _stack_images(arrays: list[np.ndarray], metas: list[dict]) -> tuple[np.ndarray, dict]:
    """One image as it is; several (same shape) stacked on a new channel axis 0, with the first one's metadata."""
    if len(arrays) == 1:
        return arrays[0], metas[0]
    meta = metas[0]
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
    return np.stack(arrays, axis=0), meta


class _StoredDtypeMixin:
    """Records the stored dtype (and, for unsigned 8/16-bit data, the stored range) in the metadata."""

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        data, meta = super().get_data(img)  # type: ignore[misc]
        meta[STORED_DTYPE] = np.dtype(data.dtype).name
        if INTENSITY_RANGE not in meta and np.dtype(data.dtype) in (np.dtype(np.uint8), np.dtype(np.uint16)):
            meta[INTENSITY_RANGE] = [0.0, float(np.iinfo(data.dtype).max)]
        return data, meta
