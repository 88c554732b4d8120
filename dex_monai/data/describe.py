# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""What the dataset index records of a file, read from its header (and, when asked, checked on its pixels): size,
spacing, slices, channels, stored type, for NIfTI, pictures, NRRD/MetaImage, NPY, NPZ stacks and DICOM objects.
Unusable files raise :class:`~dex_monai.data.checks.RejectedFile`."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dex_monai.data.checks import (
    ImageDecodeError,
    RejectedFile,
    check_spatial_dims,
    classify_error,
    is_mosaic,
)
from dex_monai.data.checks import (
    check_pixels as check_pixel_values,
)
from dex_monai.data.readers import (
    _pil_convert,
    decode_dicom_pixels,
    is_colour_last,
    medmnist_splits,
    npz_array_info,
    transfer_syntax_description,
)

__all__ = ["DESCRIBERS", "round_values", "describe_dicom_dtype", "dicom_channels", "is_volume_series", "read_dicom", "dicom_pixels"]


def round_values(values: Iterable[float] | None) -> list[float] | None:
    if values is None:
        return None
    return [round(float(v), 6) for v in values]


class _LogCapture(logging.Handler):
    """Collects warnings logged by pydicom while a file is read (they reveal truncation)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _pydicom_warnings() -> Iterator[_LogCapture]:
    """Collect what pydicom logs or warns while reading a file (instead of printing it)."""
    logger = logging.getLogger("pydicom")
    handler = _LogCapture()
    logger.addHandler(handler)
    old = logger.propagate
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def read_dicom(path: str, pixels: bool) -> Any:
    """Read a DICOM file with pydicom; raise :class:`RejectedFile` with the right category."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if os.path.getsize(path) == 0:
        raise RejectedFile("empty", "0 bytes")
    with _pydicom_warnings() as log:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except InvalidDicomError as e:
            raise RejectedFile("corrupt", f"not a valid DICOM file ({e})") from e
        except Exception as e:
            raise classify_error(e) from e
    ended = [m for m in log.messages if "end of file" in m.lower() or "truncat" in m.lower()]
    if ended:
        raise RejectedFile("truncated", ended[0])
    if pixels and "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "Rows" in ds or "Columns" in ds:
            raise RejectedFile("truncated", "image attributes present but the file ends before the pixel data")
        raise RejectedFile("no pixel data", f"DICOM object without pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    if not pixels and "Rows" not in ds and "Columns" not in ds:
        raise RejectedFile("no pixel data", f"DICOM object without image attributes (Modality {ds.get('Modality', '?')})")
    return ds


def dicom_pixels(path: str) -> np.ndarray:
    ds = read_dicom(path, pixels=True)
    try:
        return decode_dicom_pixels(ds, path)
    except ImageDecodeError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        rej = classify_error(cause)
        if rej.category == "corrupt" and "compress" in transfer_syntax_description(ds).lower():
            rej = RejectedFile("unreadable compression", str(e))
        raise RejectedFile(rej.category, str(e)) from e


def describe_dicom_dtype(ds: Any) -> str:
    bits = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits <= 8:
        return "int8" if signed else "uint8"
    if bits <= 16:
        return "int16" if signed else "uint16"
    return "int32" if signed else "uint32"


def dicom_channels(ds: Any) -> int:
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        return 3
    return int(ds.get("SamplesPerPixel", 1) or 1)


# ----------------------------------------------------------------------------------------------
# describing files (header first, then pixels)
# ----------------------------------------------------------------------------------------------


def _describe_nifti(path: str, check_pixels: bool) -> list[dict]:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        zooms = img.header.get_zooms()
        dtype = np.dtype(img.get_data_dtype()).name
    except Exception as e:
        raise classify_error(e) from e
    check_spatial_dims(shape)
    shape = shape[:3]
    if 0 in shape:
        raise RejectedFile("empty", f"shape {shape}")
    dim = 3 if len(shape) == 3 and shape[2] > 1 else 2
    size = list(shape[:dim])
    if check_pixels:
        try:
            arr = np.asanyarray(img.dataobj)
        except Exception as e:
            raise classify_error(e) from e
        check_pixel_values(arr)
    elif not path.lower().endswith(".gz"):
        offset = int(getattr(img.dataobj, "offset", 0) or img.header.get("vox_offset", 0))
        need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if os.path.getsize(path) < need:
            raise RejectedFile("truncated", f"{os.path.getsize(path)} bytes, the header needs {need}")
    return [
        {
            "dim": dim,
            "size": size,
            "spacing": round_values(zooms[:dim]),
            "num_slices": size[2] if dim == 3 else 1,
            "channels": 1,
            "dtype": dtype,
        }
    ]


def _describe_pil(path: str, check_pixels: bool) -> list[dict]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height, mode = im.width, im.height, im.mode
            if check_pixels:
                im.load()
                arr = np.asarray(_pil_convert(im))
    except UnidentifiedImageError as e:
        raise RejectedFile("corrupt", f"not a readable image ({e})") from e
    except Exception as e:
        raise classify_error(e) from e
    if width == 0 or height == 0:
        raise RejectedFile("empty", f"size {width}x{height}")
    if check_pixels:
        check_pixel_values(arr)
    channels = 1 if mode in ("L", "LA", "La", "1", "I", "F") or mode.startswith("I;") else 3
    dtype = "uint16" if mode.startswith("I;16") else ("int32" if mode == "I" else ("float32" if mode == "F" else "uint8"))
    return [{"dim": 2, "size": [width, height], "spacing": None, "num_slices": 1, "channels": channels, "dtype": dtype}]


def _describe_itk(path: str, check_pixels: bool) -> list[dict]:
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise RejectedFile("corrupt", "ITK finds no reader able to read the file")
    try:
        io.SetFileName(path)
        io.ReadImageInformation()
        nd = int(io.GetNumberOfDimensions())
        dims = [int(io.GetDimensions(i)) for i in range(nd)]
        spacing = [float(io.GetSpacing(i)) for i in range(nd)]
        comps = int(io.GetNumberOfComponents())
        ctype = str(io.GetComponentTypeAsString(io.GetComponentType()))
    except Exception as e:
        raise classify_error(e) from e
    if nd > 3:
        raise RejectedFile("unsupported", f"{nd}-D image")
    if 0 in dims:
        raise RejectedFile("empty", f"size {dims}")
    dim = 3 if nd == 3 and dims[2] > 1 else 2
    if check_pixels:
        try:
            arr = itk.array_from_image(itk.imread(path))
        except Exception as e:
            raise classify_error(e) from e
        check_pixel_values(arr)
    itk_types = {"unsigned_char": "uint8", "char": "int8", "unsigned_short": "uint16", "short": "int16", "float": "float32"}
    return [
        {
            "dim": dim,
            "size": dims[:dim],
            "spacing": round_values(spacing[:dim]),
            "num_slices": dims[2] if dim == 3 else 1,
            "channels": comps,
            "dtype": itk_types.get(ctype, ctype),
        }
    ]


def _array_layout(shape: Sequence[int]) -> tuple[int, list[int], int]:
    """(dim, size, channels) of one image array as numpy stores it ([H, W], [H, W, 3], [D, H, W])."""
    if len(shape) == 2:
        return 2, [shape[1], shape[0]], 1
    if is_colour_last(shape):
        return 2, [shape[1], shape[0]], 3
    if len(shape) == 3:
        return 3, list(shape), 1
    raise RejectedFile("unsupported", f"array of shape {tuple(shape)}: expected [H, W], [H, W, 3] or [D, H, W]")


def _describe_npy(path: str, check_pixels: bool) -> list[dict]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise RejectedFile("unsupported", f"object (pickled) array: {e}") from e
        raise classify_error(e) from e
    except Exception as e:
        raise classify_error(e) from e
    dim, size, channels = _array_layout(arr.shape)
    if check_pixels:
        try:
            full = np.load(path, allow_pickle=False)
        except Exception as e:
            raise classify_error(e) from e
        check_pixel_values(full)
    return [
        {
            "dim": dim,
            "size": size,
            "spacing": None,
            "num_slices": size[2] if dim == 3 else 1,
            "channels": channels,
            "dtype": np.dtype(arr.dtype).name,
        }
    ]


def _describe_npz(path: str, check_pixels: bool) -> list[dict]:
    try:
        info = npz_array_info(path)
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            starts_like_zip = f.read(4) == b"PK\x03\x04"
        raise RejectedFile("truncated" if starts_like_zip else "corrupt", f"not a complete zip archive ({e})") from e
    except Exception as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise RejectedFile("unsupported", f"object (pickled) array: {e}") from e
        raise classify_error(e) from e
    if not info:
        raise RejectedFile("empty", "no arrays in the npz")
    splits = medmnist_splits(list(info))
    if splits:
        groups = [(img_key, lab_key, True) for img_key, lab_key in splits]
    else:  # arrays of fewer than 2 dimensions (labels, spacings...) are not images
        groups = [(key, None, False) for key, (shape, _) in info.items() if len(shape) >= 2]
        if not groups:
            raise RejectedFile("unsupported", f"no image-shaped array in the npz ({sorted(info)})")
    out = []
    data = np.load(path, allow_pickle=False) if check_pixels else None
    try:
        for key, lab_key, stacked in groups:
            shape, dtype = info[key]
            if dtype == "object":
                raise RejectedFile("unsupported", f"'{key}' is an object (pickled) array")
            if stacked:
                if len(shape) < 3:
                    raise RejectedFile("unsupported", f"'{key}' of shape {shape} is not a stack of images")
                n = shape[0]
                dim, size, channels = _array_layout(shape[1:])
                if n == 0:
                    raise RejectedFile("empty", f"'{key}' holds no images")
            else:
                dim, size, channels = _array_layout(shape)
                n = 1
            if data is not None:
                try:
                    arr = data[key]
                except Exception as e:
                    raise classify_error(e) from e
                check_pixel_values(arr)
            entry: dict[str, Any] = {
                "dim": dim,
                "size": size,
                "spacing": None,
                "num_slices": n * (size[2] if dim == 3 else 1),
                "channels": channels,
                "dtype": dtype,
                "npz_key": key,
            }
            if stacked:
                entry["num_images"] = n
                entry["split"] = key[: -len("_images")]
                if lab_key:
                    entry["label_key"] = lab_key
            out.append(entry)
    finally:
        if data is not None:
            data.close()
    return out


DESCRIBERS = {
    "nifti": _describe_nifti,
    "png": _describe_pil,
    "jpeg": _describe_pil,
    "tiff": _describe_pil,
    "bmp": _describe_pil,
    "nrrd": _describe_itk,
    "metaimage": _describe_itk,
    "npy": _describe_npy,
    "npz": _describe_npz,
}


# ----------------------------------------------------------------------------------------------
# DICOM folders: series vs single objects
# ----------------------------------------------------------------------------------------------


def is_volume_series(headers: list[tuple[str, Any]]) -> bool:
    """Several single-frame slices of one size and orientation at distinct positions make a volume."""
    if len(headers) < 2:
        return False
    first = headers[0][1]
    orient = first.get("ImageOrientationPatient")
    positions = []
    for _, ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or is_mosaic(ds):
            return False
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            return False
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is None or iop is None or orient is None or [round(float(v), 4) for v in iop] != [round(float(v), 4) for v in orient]:
            return False
        positions.append(tuple(round(float(v), 4) for v in ipp))
    return len(set(positions)) == len(positions)

