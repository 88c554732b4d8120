# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""DICOM: headers, pixel decoding, patient geometry, Siemens mosaics, and the two MONAI readers (files and series).

:class:`DicomSeriesReader` (ITK / GDCM) reads a series folder after checking it from its headers
(:func:`check_dicom_series`); :class:`DicomFileReader` (pydicom + pylibjpeg) reads single objects, multi-frame ones and
Siemens mosaics (unpacked by nibabel's DICOM wrappers).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ITKReader
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from dex_monai.data.checks import (
    ImageDecodeError,
    RejectedFile,
    check_slice_positions,
    is_mosaic,
    slice_positions,
)
from dex_monai.data.formats import (
    DICOM_MODALITY,
    DICOM_UNITS,
    INTENSITY_RANGE,
    PATIENT_AFFINE,
    STORED_DTYPE,
    _stack_images,
    _StoredDtypeMixin,
    dicom_files_in,
    is_dicom_file,
)

__all__ = [
    "read_dicom_header",
    "transfer_syntax_description",
    "dicom_modality_tag",
    "decode_dicom_pixels",
    "dicom_pixel_spacing",
    "dicom_patient_affine",
    "check_dicom_series",
    "dicom_series_files",
    "mosaic_shape_and_spacing",
    "DicomFileReader",
    "DicomSeriesReader",
]

def read_dicom_header(path: str | os.PathLike, specific_tags: Sequence[Any] | None = None):
    """Read a DICOM header (no pixel data) with pydicom; errors name the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)
    except InvalidDicomError as e:
        raise ImageDecodeError(f"{path}: not a valid DICOM file ({e}).") from e
    except Exception as e:  # truncated or corrupt headers raise a variety of errors
        raise ImageDecodeError(f"{path}: cannot read the DICOM header: {type(e).__name__}: {e}") from e


def transfer_syntax_description(ds: Any) -> str:
    """``"<name> (<uid>)"`` of a dataset's transfer syntax, or ``"unknown transfer syntax"``."""
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None:
        return "unknown transfer syntax"
    return f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)


def dicom_modality_tag(path: str | os.PathLike, series_uid: str | None = None) -> str | None:
    """The ``Modality`` tag of a DICOM file, or of the (first / ``series_uid``) series in a folder."""
    files = dicom_files_in(path) if os.path.isdir(path) else [os.fspath(path)]
    for f in files:
        ds = read_dicom_header(f, specific_tags=["Modality", "SeriesInstanceUID"])
        if series_uid is None or str(ds.get("SeriesInstanceUID", "")) == series_uid:
            value = ds.get("Modality")
            return str(value).strip() if value else None
    return None


def decode_dicom_pixels(ds: Any, path: str | os.PathLike) -> np.ndarray:
    """``ds.pixel_array`` (pydicom + pylibjpeg), with an error naming the file and the transfer syntax."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageDecodeError(f"{path}: the DICOM object has no pixel data.")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:
        raise ImageDecodeError(
            f"{path}: cannot decode the pixel data (transfer syntax {transfer_syntax_description(ds)}): "
            f"{type(e).__name__}: {e}"
        ) from e


def _stored_range(bits: int, signed: bool) -> list[float]:
    if signed:
        return [float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)]
    return [0.0, float(2**bits - 1)]


def _positive(values: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in values][:n]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(v > 0 for v in out) else None


def dicom_pixel_spacing(ds: Any, default: Sequence[float] | None = (1.0, 1.0)) -> list[float] | None:
    """``[column spacing, row spacing]`` (x, y) in mm from PixelSpacing / ImagerPixelSpacing / functional groups;
    ``default`` when none is given (or it is not positive)."""
    for source in (ds, *_functional_group_measures(ds)):
        for tag in ("PixelSpacing", "ImagerPixelSpacing"):
            sp = _positive(source.get(tag, None) or [], 2)
            if sp is not None:
                return [sp[1], sp[0]]
    return None if default is None else [float(v) for v in default]


def _functional_group_measures(ds: Any) -> list[Any]:
    out = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            out.append(measures[0])
    return out


def dicom_patient_affine(ds: Any, spacing: Sequence[float]) -> np.ndarray:
    """The RAS affine ``[4, 4]`` of a single-frame DICOM slice as a volume ``[X, Y, 1]`` (x = columns, y = rows) from
    ``ImageOrientationPatient`` / ``ImagePositionPatient`` (when absent, as ITK reads such files: axis-aligned at the
    origin). ``spacing`` is ``[x, y]`` or ``[x, y, z]`` (mm); the slice axis is the normal of the plane."""
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is None or len(iop) != 6:
        iop = [1, 0, 0, 0, 1, 0]
    if ipp is None or len(ipp) != 3:
        ipp = [0.0, 0.0, 0.0]
    row, col = np.asarray([float(v) for v in iop[:3]]), np.asarray([float(v) for v in iop[3:]])
    lps = np.eye(4)
    lps[:3, 0] = row * float(spacing[0])
    lps[:3, 1] = col * float(spacing[1])
    lps[:3, 2] = np.cross(row, col) * (float(spacing[2]) if len(spacing) > 2 else _frame_spacing(ds))
    lps[:3, 3] = [float(v) for v in ipp]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _frame_spacing(ds: Any) -> float:
    for source in (*_functional_group_measures(ds), ds):
        for tag in ("SpacingBetweenSlices", "SliceThickness"):
            sp = _positive([source.get(tag, 0) or 0], 1)
            if sp is not None:
                return sp[0]
    return 1.0


def check_dicom_series(name: str | os.PathLike, files: Sequence[str | os.PathLike]) -> Any:
    """Check a DICOM series from its headers before any pixel is read: no Siemens mosaics (each file a volume) and,
    for several slices, evenly spaced positions along the slice normal (:func:`check_slice_positions`: a missing or
    empty slice is a gap). Returns the first header; raises :class:`RejectedFile` naming ``name``."""
    name = os.fspath(name)
    headers = [read_dicom_header(f) for f in files]
    if is_mosaic(headers[0]):
        if len(files) == 1:
            raise RejectedFile("unsupported", "a Siemens mosaic; read it as a file (DicomFileReader)", name)
        raise RejectedFile(
            "unsupported", f"{len(files)} Siemens mosaic files (each one 3-D volume: a 4-D series); give the files", name
        )
    if len(headers) > 1 and all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in headers):
        check_slice_positions(slice_positions(headers), where=name)
    return headers[0]


def dicom_series_files(folder: str | os.PathLike, series_uid: str | None = None) -> list[str]:
    """The files of one DICOM series in ``folder`` in slice order (GDCM's), chosen by its ``SeriesInstanceUID``;
    ``None`` takes the folder's only series. Raises :class:`ImageDecodeError` naming the folder."""
    import itk

    folder = os.fspath(folder)
    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(False)  # identifiers are then the plain SeriesInstanceUIDs
    gen.SetDirectory(folder)
    uids = list(gen.GetSeriesUIDs())
    if not uids:
        raise ImageDecodeError(f"{folder}: no DICOM series found in the folder.")
    if series_uid is None:
        if len(uids) > 1:
            raise ImageDecodeError(
                f"{folder}: the folder holds {len(uids)} DICOM series ({uids}); give `series_uid` to choose one."
            )
        return list(gen.GetFileNames(uids[0]))
    if series_uid not in uids:
        raise ImageDecodeError(f"{folder}: no DICOM series with SeriesInstanceUID '{series_uid}' ({uids}).")
    return list(gen.GetFileNames(series_uid))


class DicomSeriesReader(_StoredDtypeMixin, ITKReader):
    """ITK (GDCM) reader of one DICOM series in a folder, chosen by its ``SeriesInstanceUID``.

    GDCM decodes compressed transfer syntaxes (JPEG 2000, JPEG-LS, RLE...) and applies the
    rescale slope/intercept, so CT comes out in HU. Output ``[X, Y, Z]`` (slices sorted by position).

    Args:
        series_uid: the series to read; ``None`` reads the folder's only series (an error if it holds several).
        kwargs: passed to :class:`~monai.data.ITKReader`.
    """

    def __init__(self, series_uid: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.series_uid = series_uid
        self._headers: list[dict] = []

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(os.path.isdir(f) or is_dicom_file(f) for f in ensure_tuple(filename))

    def _series_files(self, folder: str) -> list[str]:
        return dicom_series_files(folder, self.series_uid)

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any):
        import itk

        images, self._headers = [], []
        for name in ensure_tuple(data):
            name = os.fspath(name)
            files = self._series_files(name) if os.path.isdir(name) else [name]
            ds = check_dicom_series(name, files)
            self._headers.append(
                {
                    DICOM_MODALITY: str(ds.get("Modality", "") or ""),
                    "photometric_interpretation": str(ds.get("PhotometricInterpretation", "") or ""),
                    "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
                    DICOM_UNITS: str(ds.get("Units", "") or ""),
                    "num_files": len(files),
                }
            )
            try:
                images.append(itk.imread(files if len(files) > 1 else files[0], **{**self.kwargs, **kwargs}))
            except Exception as e:
                raise ImageDecodeError(
                    f"{name}: ITK cannot read the DICOM series ({len(files)} files, transfer syntax "
                    f"{transfer_syntax_description(ds)}): {type(e).__name__}: {e}"
                ) from e
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        data, meta = super().get_data(img)
        if self._headers:
            meta.update(self._headers[0])
            if meta["photometric_interpretation"] == "MONOCHROME1":  # brighter = less dense: flip it
                data = (data.max() + data.min()) - data
        return data, meta


class DicomFileReader(ImageReader):
    """pydicom (+ pylibjpeg) reader of single DICOM objects, single- or multi-frame.

    - palette colour -> RGB through the palette LUT; YBR -> RGB (pydicom);
    - MONOCHROME1 is inverted so that brighter means denser, as in MONOCHROME2;
    - the modality LUT (rescale slope / intercept) is applied when it is not the identity;
    - stored range ``[0, 2**BitsStored - 1]`` recorded for integer data (16-bit X-ray, ultrasound...).

    Output (channel-last before ``EnsureChannelFirst``): ``[X, Y]``, ``[X, Y, 3]``, or with frames
    ``[X, Y, F]`` / ``[X, Y, F, 3]`` (x = columns, y = rows, F = frames).
    Errors (:class:`ImageDecodeError`) name the file and the transfer syntax.
    """

    def __init__(self, invert_monochrome1: bool = True) -> None:
        super().__init__()
        self.invert_monochrome1 = invert_monochrome1

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(is_dicom_file(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any):
        import pydicom
        from pydicom.errors import InvalidDicomError

        out = []
        for name in ensure_tuple(data):
            try:
                out.append((os.fspath(name), pydicom.dcmread(name)))
            except InvalidDicomError as e:
                raise ImageDecodeError(f"{name}: not a valid DICOM file ({e}).") from e
            except Exception as e:
                raise ImageDecodeError(f"{name}: cannot read the DICOM file: {type(e).__name__}: {e}") from e
        return out if len(out) > 1 else out[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        items = img if isinstance(img, list) else [img]
        arrays, metas = [], []
        for path, ds in items:
            arr, meta = self._to_array(path, ds)
            arrays.append(arr)
            metas.append(meta)
        return _stack_images(arrays, metas)

    def _to_array(self, path: str, ds: Any) -> tuple[np.ndarray, dict]:
        from pydicom.pixels import apply_color_lut, apply_modality_lut

        if is_mosaic(ds):
            return _read_mosaic(path, ds)
        arr = decode_dicom_pixels(ds, path)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsStored", 0) or 0)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        value_range: list[float] | None = _stored_range(bits, signed) if bits and arr.dtype.kind in "iu" else None

        if photometric == "PALETTE COLOR":
            try:
                arr = apply_color_lut(arr, ds)
            except Exception as e:
                raise ImageDecodeError(f"{path}: cannot apply the palette colour lookup table: {e}") from e
            samples = 3
            lut_bits = int((ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 8])[2])
            value_range = _stored_range(lut_bits if lut_bits in (8, 16) else 8 * arr.dtype.itemsize, False)
        elif samples == 1:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            if slope != 1.0 or intercept != 0.0 or "ModalityLUTSequence" in ds:
                arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
                value_range = None  # physical units (HU...)
            if photometric == "MONOCHROME1" and self.invert_monochrome1:
                lo, hi = value_range if value_range is not None else (float(arr.min()), float(arr.max()))
                arr = (np.asarray(hi + lo, dtype=np.float64) - arr).astype(arr.dtype if value_range else np.float32)

        has_frames = frames > 1
        colour = samples > 1
        # pydicom order: [F,] rows, cols [, S]  ->  cols (x), rows (y) [, F] [, S]
        if has_frames:
            arr = np.moveaxis(arr, 0, 2)  # rows, cols, F [, S]
        arr = np.swapaxes(arr, 0, 1)
        spacing = list(dicom_pixel_spacing(ds) or [1.0, 1.0]) + ([_frame_spacing(ds)] if has_frames else [])
        spatial_shape = np.asarray(arr.shape[: 3 if has_frames else 2])
        affine = np.diag([*spacing, 1.0]).astype(np.float64)
        meta: dict[str, Any] = {
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: spatial_shape,
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if colour else float("nan"),
            "spacing": np.asarray(spacing),
            DICOM_MODALITY: str(ds.get("Modality", "") or ""),
            "photometric_interpretation": photometric,
            "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
            "bits_stored": bits,
            "number_of_frames": frames,
            DICOM_UNITS: str(ds.get("Units", "") or ""),
            STORED_DTYPE: np.dtype(arr.dtype).name,
        }
        if value_range is not None:
            meta[INTENSITY_RANGE] = value_range
        if not has_frames:  # where the slice lies in the patient: predictions written as [X, Y, 1] keep it
            meta[PATIENT_AFFINE] = dicom_patient_affine(ds, spacing)
        return arr, meta


def _read_mosaic(path: str, ds: Any) -> tuple[np.ndarray, dict]:
    """A Siemens mosaic as the 3-D volume it holds, through nibabel's DICOM wrappers (which know the CSA header).

    nibabel gives ``[rows, columns, slices]`` with an LPS affine; the result is ``[X (columns), Y (rows), Z]`` with
    the RAS affine, as the other DICOM readers give."""
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM readers are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom.dicomwrappers import wrapper_from_data

    try:
        wrapper = wrapper_from_data(ds)
        volume = np.asarray(wrapper.get_data(), dtype=np.float32)
        lps = np.asarray(wrapper.affine, dtype=np.float64)
    except Exception as e:
        raise ImageDecodeError(f"{path}: cannot unpack the Siemens mosaic: {type(e).__name__}: {e}") from e
    volume = np.swapaxes(volume, 0, 1)
    lps = lps[:, [1, 0, 2, 3]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    meta: dict[str, Any] = {
        MetaKeys.ORIGINAL_AFFINE: affine,
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        "spacing": spacing,
        DICOM_MODALITY: str(ds.get("Modality", "") or ""),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "") or ""),
        "transfer_syntax": str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
        "mosaic": True,
        DICOM_UNITS: str(ds.get("Units", "") or ""),
        STORED_DTYPE: "float32",
    }
    return volume, meta


def mosaic_shape_and_spacing(ds: Any) -> tuple[list[int], list[float]]:
    """``([X, Y, Z], [sx, sy, sz])`` of the volume in a Siemens mosaic, from its headers (no pixels)."""
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM readers are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom.dicomwrappers import wrapper_from_data

    wrapper = wrapper_from_data(ds)
    rows, cols, slices = (int(v) for v in wrapper.image_shape)
    row_mm, col_mm, slice_mm = (float(v) for v in wrapper.voxel_sizes)
    return [cols, rows, slices], [col_mm, row_mm, slice_mm]
