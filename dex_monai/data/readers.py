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

import functools
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ITKReader, NibabelReader, NumpyReader, PILReader
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from dex_monai.data.checks import ImageDecodeError, RejectedFile, check_slice_positions, is_mosaic, slice_positions

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


# ----------------------------------------------------------------------------------------------
# format detection and DICOM headers
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------


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
        import itk

        gen = itk.GDCMSeriesFileNames.New()
        gen.SetUseSeriesDetails(False)  # identifiers are then the plain SeriesInstanceUIDs
        gen.SetDirectory(folder)
        uids = list(gen.GetSeriesUIDs())
        if not uids:
            raise ImageDecodeError(f"{folder}: no DICOM series found in the folder.")
        if self.series_uid is None:
            if len(uids) > 1:
                raise ImageDecodeError(
                    f"{folder}: the folder holds {len(uids)} DICOM series ({uids}); give `series_uid` to choose one."
                )
            uid = uids[0]
        else:
            if self.series_uid not in uids:
                raise ImageDecodeError(f"{folder}: no DICOM series with SeriesInstanceUID '{self.series_uid}' ({uids}).")
            uid = self.series_uid
        return list(gen.GetFileNames(uid))

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
    from nibabel.nicom.dicomwrappers import wrapper_from_data

    wrapper = wrapper_from_data(ds)
    rows, cols, slices = (int(v) for v in wrapper.image_shape)
    row_mm, col_mm, slice_mm = (float(v) for v in wrapper.voxel_sizes)
    return [cols, rows, slices], [col_mm, row_mm, slice_mm]


# ----------------------------------------------------------------------------------------------
# NPZ (MedMNIST layout)
# ----------------------------------------------------------------------------------------------

_MEDMNIST_SPLITS = ("train", "val", "test")


def npz_array_info(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype name)}`` of the arrays in an ``.npz``, read from the member headers (no pixels)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            out[member[: -len(".npy")]] = (tuple(int(s) for s in shape), np.dtype(dtype).name)
    return out


def medmnist_splits(keys: Sequence[str]) -> list[tuple[str, str | None]]:
    """``[(images_key, labels_key or None), ...]`` for the MedMNIST layout (``train_images``, ``train_labels``...)."""
    keys = set(keys)
    out = []
    for split in _MEDMNIST_SPLITS:
        img_key = f"{split}_images"
        if img_key in keys:
            lab_key = f"{split}_labels"
            out.append((img_key, lab_key if lab_key in keys else None))
    return out


@functools.lru_cache(maxsize=8)
def _npz_array(path: str, mtime_ns: int, size: int, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if key not in z.files:
            raise ImageDecodeError(f"{path}: no array '{key}' in the npz (it has {sorted(z.files)}).")
        return np.asarray(z[key])


def is_colour_last(shape: Sequence[int]) -> bool:
    """Whether an image array ``[H, W, C]`` is 2-D colour (``C`` in 3, 4, smaller than H and W) rather than 3-D."""
    return len(shape) == 3 and shape[-1] in (3, 4) and min(shape[0], shape[1]) > shape[-1]


def _stack_is_colour(stack_shape: Sequence[int]) -> bool:
    """A stack ``[N, H, W, 3|4]`` holds 2-D colour images (MedMNIST RGB), ``[N, D, H, W]`` 3-D volumes."""
    return len(stack_shape) == 4 and is_colour_last(stack_shape[1:])


class NpzStackReader(ImageReader):
    """Reader of one image of an ``.npz`` array (the MedMNIST ``<split>_images`` layout), ``allow_pickle=False``.

    Args:
        key: the array in the npz; ``None`` picks the only array (or ``arr_0``).
        index: the image in the stack (first axis); ``None`` reads the array as one image.

    The decoded arrays are kept in a small per-process LRU cache (keyed on path, mtime and size),
    so that reading the images of a stack one by one does not decompress it each time.
    2-D images come out ``[X, Y]`` (axes swapped from numpy's ``[H, W]``, as Pillow images),
    colour ``[X, Y, 3]``; 3-D volumes ``[D, H, W]`` as stored.
    """

    def __init__(self, key: str | None = None, index: int | None = None) -> None:
        super().__init__()
        self.key = key
        self.index = index

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        return all(os.fspath(f).lower().endswith(".npz") for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any):
        out = []
        for name in ensure_tuple(data):
            name = os.fspath(name)
            st = os.stat(name)
            key = self.key
            if key is None:
                keys = list(npz_array_info(name))
                key = keys[0] if len(keys) == 1 else ("arr_0" if "arr_0" in keys else None)
                if key is None:
                    raise ImageDecodeError(f"{name}: the npz holds several arrays {keys}; give `npz_key`.")
            try:
                stack = _npz_array(os.path.abspath(name), st.st_mtime_ns, st.st_size, key)
            except ImageDecodeError:
                raise
            except Exception as e:
                raise ImageDecodeError(f"{name}: cannot read array '{key}': {type(e).__name__}: {e}") from e
            out.append((name, key, stack))
        return out if len(out) > 1 else out[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        items = img if isinstance(img, list) else [img]
        arrays, metas = [], []
        for name, key, stack in items:
            if self.index is None:
                arr, colour = stack, is_colour_last(stack.shape)
            else:
                if not -len(stack) <= self.index < len(stack):
                    raise ImageDecodeError(f"{name}: index {self.index} out of range for '{key}' ({len(stack)} images).")
                arr, colour = stack[self.index], _stack_is_colour(stack.shape)
            spatial_nd = arr.ndim - (1 if colour else 0)
            if spatial_nd == 2:
                arr = np.swapaxes(arr, 0, 1)
            affine = np.eye(spatial_nd + 1)
            meta: dict[str, Any] = {
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:spatial_nd]),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if colour else float("nan"),
                "spacing": np.ones(spatial_nd),
                "npz_key": key,
                "npz_index": -1 if self.index is None else int(self.index),
                STORED_DTYPE: np.dtype(arr.dtype).name,
            }
            if arr.dtype in (np.uint8, np.uint16):
                meta[INTENSITY_RANGE] = [0.0, float(np.iinfo(arr.dtype).max)]
            arrays.append(np.ascontiguousarray(arr))
            metas.append(meta)
        return _stack_images(arrays, metas)


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
