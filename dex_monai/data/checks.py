"""What makes an image unusable, in one place: the errors, the pixel checks and the DICOM geometry checks.

Used by the readers (:mod:`dex_monai.data.readers`), the checked loading transform
(:class:`dex_monai.transforms.LoadMultiModalImaged`), the dataset index and the pre-training dataset, so that a file
is rejected for the same reason, with the same words, whichever entry point reads it.

Rejection categories (:data:`REJECT_CATEGORIES`): empty, corrupt, truncated, unreadable compression, constant,
non-finite, unsupported, unknown modality, no pixel data, bad geometry.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "REJECT_CATEGORIES",
    "ImageDecodeError",
    "RejectedFile",
    "classify_error",
    "check_pixels",
    "check_spatial_dims",
    "slice_positions",
    "check_slice_positions",
    "is_mosaic",
]

REJECT_CATEGORIES = (
    "empty",
    "corrupt",
    "truncated",
    "unreadable compression",
    "constant",
    "non-finite",
    "unsupported",
    "unknown modality",
    "no pixel data",
    "bad geometry",
)


class ImageDecodeError(RuntimeError):
    """A file could not be decoded; the message names the file and, for DICOM, the transfer syntax."""


class RejectedFile(ImageDecodeError):
    """A file that cannot be used: ``category`` (one of :data:`REJECT_CATEGORIES`) and a ``detail``.

    ``str()`` gives ``"<category>: <detail>"``; with ``path`` the detail is prefixed by the file.
    """

    def __init__(self, category: str, detail: str, path: str | os.PathLike | None = None) -> None:
        self.category = category
        self.detail = detail
        self.path = None if path is None else os.fspath(path)
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(f"{prefix}{category}: {detail}")

    def with_path(self, path: str | os.PathLike) -> RejectedFile:
        """The same rejection naming ``path`` (unchanged when it names a file already)."""
        return self if self.path else RejectedFile(self.category, self.detail, path)


_TRUNCATION_WORDS = (
    "truncated",
    "ended before",
    "end of file",
    "unexpected end",
    "less than expected",
    "could only read",
    "not fully written",
    "fewer bytes",
    "compressed file ended",
)
_COMPRESSION_WORDS = ("plugins are missing", "no pixel data handler", "unable to decompress", "unable to decode")


def classify_error(exc: BaseException, path: str | os.PathLike | None = None) -> RejectedFile:
    """Map a decoder exception to a :class:`RejectedFile` (truncated, unreadable compression or corrupt)."""
    if isinstance(exc, RejectedFile):
        return exc if path is None else exc.with_path(path)
    cause = exc.__cause__ if isinstance(exc, ImageDecodeError) and exc.__cause__ is not None else exc
    if isinstance(exc, ImageDecodeError):  # the reader's own words, without the file name it starts with
        text = str(exc)
        if path is not None and text.startswith(f"{os.fspath(path)}: "):
            text = text[len(os.fspath(path)) + 2 :]
    else:
        text = f"{type(exc).__name__}: {exc}"
    low = f"{text} {type(cause).__name__}: {cause}".lower()
    if isinstance(cause, EOFError) or any(k in low for k in _TRUNCATION_WORDS):
        return RejectedFile("truncated", text, path)
    if "allow_pickle" in low or "object arrays" in low:
        return RejectedFile("unsupported", f"object (pickled) array, never unpickled: {text}", path)
    if any(k in low for k in _COMPRESSION_WORDS):
        return RejectedFile("unreadable compression", text, path)
    return RejectedFile("corrupt", text, path)


def check_pixels(arr: Any, path: str | os.PathLike | None = None, constant_ok: bool = False) -> None:
    """Reject empty, object, non-finite and (unless ``constant_ok``, e.g. for label maps) constant arrays."""
    a = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
    if a.size == 0:
        raise RejectedFile("empty", "the image has no pixels", path)
    if a.dtype.kind == "O":
        raise RejectedFile("unsupported", "object array", path)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise RejectedFile("non-finite", f"{bad} of {a.size} values are NaN/Inf", path)
    if not constant_ok:
        lo, hi = a.min(), a.max()
        if lo == hi:
            raise RejectedFile("constant", f"all pixels are {lo.item() if hasattr(lo, 'item') else lo}", path)


def check_spatial_dims(shape: Sequence[int], path: str | os.PathLike | None = None) -> None:
    """Reject images with an axis beyond the third longer than 1 (time series, 4-D NIfTI...)."""
    shape = tuple(int(s) for s in shape)
    if any(s > 1 for s in shape[3:]):
        raise RejectedFile(
            "unsupported", f"{len(shape)}-D image {shape} (time series?); split it into 3-D volumes", path
        )


# ----------------------------------------------------------------------------------------------
# DICOM series geometry, from the headers alone
# ----------------------------------------------------------------------------------------------


def slice_positions(headers: Sequence[Any]) -> np.ndarray:
    """Position of every slice along the slice normal (mm), in the given order.

    ``headers`` are pydicom datasets (pixel data not needed) with ``ImagePositionPatient`` and the same
    ``ImageOrientationPatient``; the normal is the cross product of the row and column direction cosines.
    """
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in headers])


def check_slice_positions(
    positions: Sequence[float], where: str | os.PathLike | None = None, rtol: float = 0.01, atol: float = 1e-3
) -> float:
    """The slice spacing (mm) of a series whose slices lie at ``positions`` along the normal.

    Raises:
        RejectedFile("bad geometry"): two slices at the same position, a gap (a missing or unreadable slice), or
            spacings that differ by more than ``rtol`` of the median spacing plus ``atol`` mm.
    """
    pos = np.sort(np.asarray(positions, dtype=np.float64))
    if len(pos) < 2:
        return 1.0
    diffs = np.diff(pos)
    median = float(np.median(diffs))
    if float(diffs.min()) <= atol:
        raise RejectedFile("bad geometry", f"two slices at the same position ({len(pos)} slices)", where)
    worst = int(np.argmax(np.abs(diffs - median)))
    if abs(float(diffs[worst]) - median) > rtol * median + atol:
        step = float(diffs[worst])
        what = "a gap (missing slice?)" if step > 1.5 * median else "non-uniform slice spacing"
        raise RejectedFile(
            "bad geometry",
            f"{what}: {step:.4g} mm between slices {worst} and {worst + 1} of {len(pos)} where the others are "
            f"{median:.4g} mm apart; resample the series yourself if this is intended",
            where,
        )
    return median


def is_mosaic(ds: Any) -> bool:
    """Whether a DICOM dataset is a Siemens mosaic (a 3-D volume tiled into one frame), per its CSA header."""
    if (0x29, 0x10) not in ds:
        return False
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM readers are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        return bool(csareader.is_mosaic(csareader.get_csa_header(ds)))
    except Exception:  # an unreadable private header: read the file as the plain image it also is
        return False
