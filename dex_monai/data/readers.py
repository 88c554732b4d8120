"""MONAI image readers for the DEX modalities, and the helpers that pick one per file.

Which reader reads what (all through MONAI :class:`~monai.transforms.LoadImage`):

=====================  ==========================================================================
format                 reader
=====================  ==========================================================================
DICOM series (folder)  :class:`DicomSeriesReader` (ITK / GDCM; JPEG 2000 and other compressed
                       transfer syntaxes), series chosen by ``SeriesInstanceUID``
DICOM file             :class:`DicomFileReader` (pydicom + pylibjpeg): multi-frame, palette and
                       YBR colour, MONOCHROME1, 16-bit
NIfTI                  :class:`NiftiReader` (nibabel)
PNG / JPEG / TIFF/BMP  :class:`PILImageReader` (Pillow; palette -> RGB, alpha dropped, 16-bit kept)
NRRD / MetaImage       :class:`ITKImageReader`
NPY                    :class:`NumpyImageReader`
NPZ (MedMNIST layout)  :class:`NpzStackReader` (one image of ``<split>_images``)
=====================  ==========================================================================

Every reader records in the metadata the stored data type (``stored_dtype``) and, for integer
display data, the stored intensity range (``intensity_range``), used by
:class:`dex_monai.transforms.ModalityNormalize` to divide 8-bit by 255 and 16-bit by its range.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ITKReader, NibabelReader, NumpyReader, PILReader
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys

from dex_monai.data.checks import ImageDecodeError, RejectedFile
from dex_monai.data.dicom import (
    DicomFileReader,
    DicomSeriesReader,
    check_dicom_series,
    decode_dicom_pixels,
    dicom_modality_tag,
    dicom_patient_affine,
    dicom_pixel_spacing,
    mosaic_shape_and_spacing,
    read_dicom_header,
    transfer_syntax_description,
)
from dex_monai.data.formats import (
    _ITK_FORMATS,
    DICOM_MODALITY,
    DICOM_UNITS,
    DISPLAY_REFERRED,
    IMAGE_SUFFIXES,
    INTENSITY_RANGE,
    PATIENT_AFFINE,
    PIL_FORMATS,
    SOURCE_FORMAT,
    STORED_DTYPE,
    _StoredDtypeMixin,
    dicom_files_in,
    image_format,
    image_stem,
    is_colour_last,
    is_dicom_file,
    is_dicom_series_folder,
)
from dex_monai.data.npz import NpzStackReader, medmnist_splits, npz_array_info

__all__ = [
    "STORED_DTYPE",
    "INTENSITY_RANGE",
    "SOURCE_FORMAT",
    "DISPLAY_REFERRED",
    "DICOM_MODALITY",
    "DICOM_UNITS",
    "PATIENT_AFFINE",
    "dicom_patient_affine",
    "PIL_FORMATS",
    "ImageDecodeError",
    "IMAGE_SUFFIXES",
    "image_format",
    "image_stem",
    "is_dicom_file",
    "is_dicom_series_folder",
    "dicom_files_in",
    "check_dicom_series",
    "read_dicom_header",
    "transfer_syntax_description",
    "dicom_modality_tag",
    "decode_dicom_pixels",
    "dicom_pixel_spacing",
    "DicomFileReader",
    "DicomSeriesReader",
    "NiftiReader",
    "PILImageReader",
    "ITKImageReader",
    "NumpyImageReader",
    "NpzStackReader",
    "medmnist_splits",
    "mosaic_shape_and_spacing",
    "npz_array_info",
    "reader_for",
]


def _pil_convert(img: Any) -> Any:
    """Pillow modes -> arrays DEX can use: palette -> RGB, alpha dropped, bilevel/CMYK/YCbCr converted."""
    mode = img.mode
    if mode in ("P", "PA"):
        return img.convert("RGB")
    if mode in ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode in ("LA", "La", "1"):
        return img.convert("L")
    return img


def _pil_label_convert(img: Any) -> Any:
    """Pillow modes of label masks: palette images keep their indices (the classes), alpha is dropped."""
    if img.mode in ("P", "L", "I", "I;16", "1"):
        return img.convert("L") if img.mode == "1" else img
    return _pil_convert(img)


class PILImageReader(_StoredDtypeMixin, PILReader):
    """MONAI :class:`~monai.data.PILReader` for PNG/JPEG/TIFF/BMP with DEX conversions.

    Palette images become RGB, alpha channels are dropped, 16-bit grey (``I;16``) is kept as ``uint16``.
    Output (channel-last before ``EnsureChannelFirst``): ``[W, H]`` grey or ``[W, H, 3]`` colour.
    """

    def __init__(self, converter: Any = _pil_convert, reverse_indexing: bool = True, **kwargs: Any) -> None:
        super().__init__(converter=converter, reverse_indexing=reverse_indexing, **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        data, meta = super().get_data(img)
        if data.dtype == np.int32 and data.size and data.min() >= 0 and data.max() <= 65535:
            meta[INTENSITY_RANGE] = [0.0, 65535.0]  # 16-bit PNG opened as 32-bit "I"
        meta[DISPLAY_REFERRED] = True
        return data, meta


class NiftiReader(_StoredDtypeMixin, NibabelReader):
    """MONAI :class:`~monai.data.NibabelReader` recording the stored dtype. Output ``[X, Y, Z]``."""


class ITKImageReader(_StoredDtypeMixin, ITKReader):
    """MONAI :class:`~monai.data.ITKReader` (NRRD, MetaImage...) recording the stored dtype."""


class NumpyImageReader(_StoredDtypeMixin, NumpyReader):
    """MONAI :class:`~monai.data.NumpyReader` for ``.npy`` (``allow_pickle=False``) recording the stored dtype.

    Arrays are taken as numpy stores images: ``[H, W]`` grey and ``[H, W, 3|4]`` colour come out
    ``[X, Y]`` / ``[X, Y, C]`` (axes swapped, as Pillow images); ``[D, H, W]`` volumes as stored.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["allow_pickle"] = False
        super().__init__(**kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        data, meta = super().get_data(img)
        if data.ndim == 2 or is_colour_last(data.shape):
            data = np.swapaxes(data, 0, 1)
            colour = data.ndim == 3
            meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(data.shape[:2])
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1 if colour else float("nan")
        return data, meta


def reader_for(
    path: str | os.PathLike,
    series_uid: str | None = None,
    npz_key: str | None = None,
    npz_index: int | None = None,
    label: bool = False,
) -> ImageReader:
    """The MONAI reader for ``path`` (see the module table); :class:`RejectedFile` for unsupported files.
    With ``label`` palette pictures keep their indices (label masks) instead of becoming RGB."""
    fmt = image_format(path)
    if fmt == "dicom-series":
        return DicomSeriesReader(series_uid=series_uid)
    if fmt == "dicom":
        return DicomFileReader()
    if fmt == "nifti":
        return NiftiReader()
    if fmt in PIL_FORMATS:
        return PILImageReader(converter=_pil_label_convert) if label else PILImageReader()
    if fmt in _ITK_FORMATS:
        return ITKImageReader()
    if fmt == "npy":
        return NumpyImageReader()
    if fmt == "npz":
        return NpzStackReader(key=npz_key, index=npz_index)
    raise RejectedFile("unsupported", f"'{Path(path).suffix or Path(path).name}' is not a supported image format", path)
