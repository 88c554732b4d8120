# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
DICOM Segmentation objects for label maps predicted on DICOM inputs, written through highdicom.

The label map comes in the input's voxel grid (``[X, Y, Z]`` with its RAS affine, as the NIfTI output is written);
each source instance gets the frame of labels lying on its pixels, so the SEG references every source instance
frame by frame and decodes back onto exactly the NIfTI output's geometry.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dex_monai.data.checks import RejectedFile
from dex_monai.data.dicom import dicom_series_files
from dex_monai.data.formats import image_format, is_dicom_file

__all__ = ["DICOM_SEG_FORMAT", "OUTPUT_FORMATS", "output_format_ext", "check_dicom_seg_inputs", "write_dicom_seg"]

DICOM_SEG_FORMAT = "dicom_seg"
# output_format -> file ending of the prediction ("auto": PNG for picture inputs, NIfTI for the rest)
OUTPUT_FORMATS = {"auto": "auto", "nifti": ".nii.gz", "png": ".png", DICOM_SEG_FORMAT: ".dcm"}
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def output_format_ext(output_format: str) -> str:
    """The prediction's file ending for a bundle's ``output_format`` (``auto``, ``nifti``, ``png``, ``dicom_seg``)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format {output_format!r} is not one of {sorted(OUTPUT_FORMATS)}.")
    return OUTPUT_FORMATS[output_format]


def _is_dicom_input(path: str) -> bool:
    return os.path.isdir(path) or is_dicom_file(path)


def check_dicom_seg_inputs(items: Sequence[Mapping], output_format: str, image_key: str = "image") -> list[dict]:
    """``items`` unchanged when ``output_format`` is not ``dicom_seg``; otherwise every input must be DICOM (a series
    folder or a DICOM file), because a DICOM SEG references its source instances.

    Raises:
        ValueError: naming the inputs that are not DICOM and what they are.
    """
    items = [dict(item) for item in items]
    if output_format != DICOM_SEG_FORMAT:
        return items
    others = [str(item[image_key]) for item in items if not _is_dicom_input(str(item[image_key]))]
    if others:
        shown = ", ".join(f"{p} ({image_format(p) or 'unknown format'})" for p in others[:5])
        raise ValueError(
            f"output_format 'dicom_seg' needs DICOM inputs (a series folder or DICOM files): {len(others)} of "
            f"{len(items)} inputs are not DICOM: {shown}{' ...' if len(others) > 5 else ''}. Use output_format "
            "'nifti' (or 'png' for 2D pictures) for them."
        )
    return items


def _source_datasets(source: str | os.PathLike, series_uid: str | None) -> list[Any]:
    import pydicom

    source = os.fspath(source)
    files = dicom_series_files(source, series_uid) if os.path.isdir(source) else [source]
    datasets = [pydicom.dcmread(f) for f in files]
    for f, ds in zip(files, datasets):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise RejectedFile("unsupported", "multi-frame DICOM objects cannot be referenced by a DICOM SEG here", f)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise RejectedFile("unsupported", "no patient geometry (position/orientation/spacing) for a DICOM SEG", f)
    return datasets


def _frame_on_grid(label: np.ndarray, world_to_voxel: np.ndarray, ds: Any, where: str) -> np.ndarray:
    """The labels of ``label`` ``[X, Y, Z]`` at the pixel centres of the instance ``ds`` ``[rows, columns]``."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    # DICOM: position of pixel (r, c) = origin + c * column spacing * row direction + r * row spacing * column direction
    world = (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64)[:, None]
        + np.outer(orientation[:3], c.ravel() * col_spacing)
        + np.outer(orientation[3:], r.ravel() * row_spacing)
    )
    voxel = world_to_voxel[:3, :3] @ world + world_to_voxel[:3, 3:]
    index = np.rint(voxel).astype(np.int64)
    shape = np.asarray(label.shape)[:, None]
    if np.abs(voxel - index).max() > 0.05 or (index < 0).any() or (index >= shape).any():
        raise ValueError(f"{where}: the prediction's grid does not cover this instance's pixels (different geometry).")
    return label[index[0], index[1], index[2]].reshape(rows, cols)


def write_dicom_seg(
    label: np.ndarray,
    affine: np.ndarray,
    source: str | os.PathLike,
    path: str | os.PathLike,
    segment_names: Mapping[int, str],
    series_uid: str | None = None,
    algorithm_name: str = "dex_monai",
    algorithm_version: str = "0",
) -> Path:
    """
    Write the label map ``label`` ``[X, Y, Z]`` (or ``[X, Y]`` for a single image), whose RAS ``affine`` (4x4) places
    it in patient space, as a binary DICOM Segmentation of the DICOM ``source`` (a series folder, ``series_uid``
    choosing the series, or one file). Label value ``n`` becomes segment ``n`` named ``segment_names[n]``; frames
    without any label are left out, as highdicom does by default.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    label = np.asarray(label)
    if label.ndim == 2:
        label = label[..., None]
    datasets = _source_datasets(source, series_uid)
    world_to_voxel = np.linalg.inv(_LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64))  # DICOM positions are LPS
    frames = np.stack([_frame_on_grid(label, world_to_voxel, ds, os.fspath(source)) for ds in datasets])
    names = {int(k): str(v) for k, v in segment_names.items() if int(k) > 0}
    unknown = sorted(set(np.unique(frames).tolist()) - set(names) - {0})
    if unknown:
        raise ValueError(f"{os.fspath(source)}: label values {unknown} have no segment name (known: {names}).")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in sorted(names.items())
    ]
    with warnings.catch_warnings():  # patient names are copied from the source as they are (e.g. "PGBM-001")
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames.astype(np.uint16 if max(names, default=0) > 255 else np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="dex_monai",
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            device_serial_number="0",
            series_description=f"{algorithm_name} segmentation"[:64],
        )
    path = Path(path)
    seg.save_as(str(path))
    return path
