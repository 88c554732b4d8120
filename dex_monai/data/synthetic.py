"""A small synthetic multi-modality data set (all ten modalities) that runs anywhere.

CT, MR and PET are NIfTI volumes with plausible values (CT in HU, int16; MR in arbitrary
scanner units, int16; PET in SUV, float32, marked ``"units": "SUV"``); the 2-D modalities are
8-bit PNGs, grey (X-ray, ultrasound, OCT) or RGB (fundus, pathology, endoscopy, photo) as the
real data are. The volumes have empty (air) slices at both ends, so slice filtering has work to do.
Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same files.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dex_monai.data.modality import MODALITIES, ModalityRules

__all__ = ["SYNTHETIC_FOLDERS", "make_segmentation_set", "make_synthetic_dataset", "write_dicom_series"]

#: sub-folder of each modality in the synthetic data set
SYNTHETIC_FOLDERS: dict[str, str] = {
    "CT": "ct",
    "PET": "pet",
    "MR": "mr",
    "X-ray": "xray",
    "ultrasound": "ultrasound",
    "fundus": "fundus",
    "OCT": "oct",
    "pathology": "pathology",
    "endoscopy": "endoscopy",
    "photo": "photo",
}


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] along each axis, broadcastable to ``shape``."""
    return list(np.meshgrid(*[np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape], indexing="ij"))


def _ellipsoid(coords: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, centre, radii)) <= 1.0


def _body(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[list[np.ndarray], np.ndarray]:
    coords = _grid(shape)
    radii = (rng.uniform(0.6, 0.8), rng.uniform(0.45, 0.65), 0.7)  # z radius leaves empty end slices
    return coords, _ellipsoid(coords, (0.0, 0.0, 0.0), radii)


def _ct(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    coords, body = _body(rng, shape)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[body] = -90.0  # fat
    inner = _ellipsoid(coords, (0, 0, 0), (0.55, 0.4, 0.65))
    vol[inner] = 40.0  # soft tissue
    vol[_ellipsoid(coords, (0.25, -0.05, 0.0), (0.2, 0.15, 0.5))] = 60.0  # liver-like organ
    vol[_ellipsoid(coords, (-0.2, 0.1, 0.0), (0.12, 0.1, 0.4))] = -850.0  # lung / gas
    vol[_ellipsoid(coords, (0.0, 0.3, 0.0), (0.08, 0.08, 0.7))] = 700.0  # spine
    vol += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return np.clip(vol, -1024, 3071).astype(np.int16)


def _mr(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    coords, body = _body(rng, shape)
    vol = np.zeros(shape, dtype=np.float32)
    vol[body] = 350.0
    vol[_ellipsoid(coords, (0, 0, 0), (0.5, 0.4, 0.6))] = 600.0
    vol[_ellipsoid(coords, (-0.15, 0.05, 0.0), (0.15, 0.12, 0.4))] = 900.0
    vol *= 1.0 + 0.3 * coords[0]  # coil bias field
    vol += np.abs(rng.normal(0.0, 8.0, shape)).astype(np.float32)  # Rician-like background
    return np.clip(vol, 0, 4095).astype(np.int16)


def _pet(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    coords, body = _body(rng, shape)
    vol = np.zeros(shape, dtype=np.float32)
    vol[body] = 1.0
    for _ in range(3):
        c = (*rng.uniform(-0.35, 0.35, 2), rng.uniform(-0.3, 0.3))
        vol[_ellipsoid(coords, c, (0.08, 0.08, 0.1))] = rng.uniform(5.0, 15.0)
    vol[body] += rng.gamma(2.0, 0.1, int(body.sum())).astype(np.float32)
    return vol.astype(np.float32)


def _xray(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid((size, size))
    img = 60.0 + 120.0 * _ellipsoid([x, y], (0, 0.05), (0.85, 0.95))
    for cx in (-0.35, 0.35):
        img[_ellipsoid([x, y], (cx, -0.05), (0.25, 0.55))] = 50.0
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _ultrasound(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid((size, size))
    r, theta = np.hypot(x, y + 1.0), np.arctan2(x, y + 1.0)
    fan = (r < 1.9) & (np.abs(theta) < 0.6)
    speckle = rng.rayleigh(40.0, (size, size))
    img = np.where(fan, speckle * (1.2 - 0.4 * r / 1.9), 0.0)
    img[_ellipsoid([x, y], (0.1, 0.3), (0.2, 0.15)) & fan] *= 0.2  # dark lesion
    return np.clip(img, 0, 255).astype(np.uint8)


def _oct(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid((size, size))
    surface = 0.2 * np.sin(3.0 * y + rng.uniform(0, np.pi))
    depth = x - surface
    img = np.where((depth > -0.3) & (depth < 0.3), 120 + 80 * np.cos(12 * depth), 10.0)
    img = img * rng.gamma(4.0, 0.25, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def _rgb(rng: np.random.Generator, size: int, modality: str) -> np.ndarray:
    x, y = _grid((size, size))
    img = np.zeros((size, size, 3), dtype=np.float32)
    if modality == "fundus":
        disc = _ellipsoid([x, y], (0, 0), (0.95, 0.95))
        img[disc] = (190.0, 80.0, 30.0)
        img[_ellipsoid([x, y], (0.1, 0.35), (0.12, 0.12))] = (250.0, 220.0, 150.0)  # optic disc
        for k in range(4):
            vessel = np.abs(np.sin(2.0 * (y - 0.35) + k) * 0.6 - (x - 0.1)) < 0.02
            img[vessel & disc] = (120.0, 30.0, 20.0)
    elif modality == "pathology":
        img[:] = (235.0, 190.0, 215.0)
        for _ in range(25):
            c = rng.uniform(-0.9, 0.9, 2)
            img[_ellipsoid([x, y], c, rng.uniform(0.04, 0.09, 2))] = (110.0, 60.0, 150.0)
    elif modality == "endoscopy":
        vignette = np.clip(1.2 - np.hypot(x, y), 0, 1)[..., None]
        img[:] = (200.0, 90.0, 80.0)
        img *= vignette
        img[_ellipsoid([x, y], (0.2, -0.2), (0.15, 0.2))] = (240.0, 180.0, 170.0)
    else:  # photo: skin with a lesion
        img[:] = (225.0, 180.0, 150.0)
        img[_ellipsoid([x, y], (0.0, 0.0), (0.3, 0.25))] = (110.0, 70.0, 50.0)
    img += rng.normal(0.0, 5.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_per_modality: int = 4,
    size: int = 64,
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    depth: int | None = None,
    datalist_name: str = "datalist.json",
) -> str:
    """Write a small fake image set of the DEX modalities and its datalist; returns the datalist path.

    Args:
        out_dir: folder to write into (created); one sub-folder per modality (:data:`SYNTHETIC_FOLDERS`).
        n_per_modality: images per modality.
        size: in-plane size (pixels) of every image / volume.
        seed: random seed; the same arguments give the same files.
        modalities: which modalities to write (default: all ten).
        depth: number of slices of the CT/MR/PET volumes (default ``size // 2``).
        datalist_name: file name of the datalist JSON written in ``out_dir`` (paths relative to it).

    The datalist has the index's format (:func:`dex_monai.data.index.build_datalist`): ``training``
    entries with ``image``, ``modality``, ``dim``, ``size``... PET entries carry ``"units": "SUV"``.
    """
    import nibabel as nib
    from PIL import Image

    from dex_monai.data.index import build_datalist, write_datalist

    out_dir = os.path.abspath(os.fspath(out_dir))
    depth = int(depth) if depth is not None else max(size // 2, 4)
    rng = np.random.default_rng(seed)
    volumes = {"CT": _ct, "MR": _mr, "PET": _pet}
    grey = {"X-ray": _xray, "ultrasound": _ultrasound, "OCT": _oct}
    unknown = [m for m in modalities if m not in SYNTHETIC_FOLDERS]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; choose among {MODALITIES}.")
    for modality in MODALITIES:  # fixed order keeps the random stream stable
        if modality not in modalities:
            continue
        folder = os.path.join(out_dir, SYNTHETIC_FOLDERS[modality])
        os.makedirs(folder, exist_ok=True)
        for i in range(n_per_modality):
            stem = os.path.join(folder, f"{SYNTHETIC_FOLDERS[modality]}_{i:03d}")
            if modality in volumes:
                vol = volumes[modality](rng, (size, size, depth))
                affine = np.diag([1.5, 1.5, 3.0, 1.0])
                nib.save(nib.Nifti1Image(vol, affine), stem + ".nii.gz")
            elif modality in grey:
                Image.fromarray(grey[modality](rng, size), mode="L").save(stem + ".png")
            else:
                Image.fromarray(_rgb(rng, size, modality), mode="RGB").save(stem + ".png")
    wanted = [m for m in MODALITIES if m in modalities]
    folders = [os.path.join(out_dir, SYNTHETIC_FOLDERS[m]) for m in wanted]
    rules = ModalityRules([(glob.escape(Path(f).as_posix()) + "/*", m) for f, m in zip(folders, wanted)])
    datalist = build_datalist(folders, rules=rules, progress=False, relative_to=out_dir, name="dex_monai synthetic")
    for entry in datalist["training"]:
        if entry["modality"] == "PET":
            entry["units"] = "SUV"
    return write_datalist(datalist, os.path.join(out_dir, datalist_name))


def write_dicom_series(
    folder: str | os.PathLike,
    volume: np.ndarray,
    modality: str = "CT",
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    rescale_intercept: float | None = None,
    series_uid: str | None = None,
    prefix: str = "",
) -> list[str]:
    """Write a volume ``[X, Y, Z]`` as an uncompressed DICOM series, one file per slice; returns the paths.

    Args:
        folder: output folder (created).
        volume: integer values in the modality's units (HU for CT).
        modality: DICOM ``Modality`` tag (``CT``, ``MR``, ``PT``...).
        spacing: ``(x, y, z)`` spacing in mm.
        rescale_intercept: stored = value - intercept (default: -1024 for CT, 0 otherwise).
        series_uid: ``SeriesInstanceUID`` (default: derived from the folder, modality and prefix).
        prefix: file-name prefix (to write several series into one folder).

    The UIDs are derived from the arguments, so the same call writes the same files (tests, benchmarks).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128"}
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"write_dicom_series: expected a volume [X, Y, Z], got shape {vol.shape}.")
    intercept = float(rescale_intercept if rescale_intercept is not None else (-1024.0 if modality == "CT" else 0.0))
    stored = np.round(vol.astype(np.float64) - intercept)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("write_dicom_series: values do not fit 16-bit unsigned storage with this intercept.")
    seed = [os.path.abspath(folder), modality, prefix]
    series_uid = series_uid or generate_uid(entropy_srcs=[*seed, "series"])
    study_uid = generate_uid(entropy_srcs=[*seed, "study"])
    paths = []
    for z in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class.get(modality, "1.2.840.10008.5.1.4.1.1.7")
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*seed, series_uid, str(z)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, study_uid
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z * spacing[2])]
        ds.InstanceNumber = z + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = np.ascontiguousarray(stored[:, :, z].T.astype(np.uint16)).tobytes()  # rows = y
        path = os.path.join(folder, f"{prefix}{z:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_segmentation_set(folder: str | os.PathLike, count: int, size: int, seed: int) -> None:
    """Grey PNG images with bright blobs on textured background (``image/``) and their masks (``label/``)."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "label").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            ry, rx = rng.uniform(0.06, 0.18, 2) * size
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        background = 60 + 25 * np.sin(xx / rng.uniform(3, 8)) + rng.normal(0, 12, (size, size))
        image = np.where(mask, 170 + rng.normal(0, 15, (size, size)), background)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "image" / f"case_{i:03d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "label" / f"case_{i:03d}.png")
