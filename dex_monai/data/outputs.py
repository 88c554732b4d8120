# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Where predictions go: every inference output path, always under the output folder and never beside an input."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dex_monai.data.dicom_seg import check_dicom_seg_inputs, output_format_ext
from dex_monai.data.readers import PIL_FORMATS, image_format, image_stem

__all__ = ["OUTPUT_PATH_KEY", "prediction_ext", "check_output_dir", "plan_outputs"]

#: item key of a prediction's planned path (:func:`plan_outputs`)
OUTPUT_PATH_KEY = "output_path"


def prediction_ext(image: str | os.PathLike, output_ext: str = "auto") -> str:
    """The file ending of a prediction: ``output_ext``, or with ``"auto"`` ``.png`` for picture inputs (PNG, JPEG,
    BMP, TIFF) and ``.nii.gz`` for everything else (NIfTI, DICOM, MetaImage...), which keeps the input's geometry."""
    if output_ext not in (None, "", "auto"):
        return output_ext if output_ext.startswith(".") else "." + output_ext
    return ".png" if image_format(image) in PIL_FORMATS else ".nii.gz"


def _source_tag(image: str) -> str:
    """What tells two same-named inputs apart: their suffix (``a.nii.gz`` -> ``nii``), or ``series`` for a folder."""
    if os.path.isdir(image):
        return "series"
    name = os.path.basename(image)
    suffix = name[len(image_stem(name)) :].lstrip(".")
    return suffix.split(".")[0].lower() or "file"


def check_output_dir(items: Sequence[Mapping], output_dir: str | os.PathLike, image_key: str = "image") -> Path:
    """``output_dir`` made absolute, after checking that it is neither a folder holding inputs nor inside one (nor
    inside an input DICOM series folder): outputs never go beside a user's images.

    Raises:
        ValueError: naming the output folder and the input folder.
    """
    out_root = Path(os.path.abspath(os.fspath(output_dir)))
    images = [Path(os.path.abspath(os.fspath(item[image_key]))) for item in items]
    folders = {p for p in images if p.is_dir()} | {p.parent for p in images}
    for folder in sorted(folders):
        if out_root == folder or folder in out_root.parents:
            raise ValueError(
                f"output_dir {out_root} is {'the' if out_root == folder else 'inside the'} input folder {folder}: "
                "outputs are never written beside the inputs; choose an output_dir outside the input folders."
            )
    return out_root


def plan_outputs(
    items: Sequence[Mapping],
    output_dir: str | os.PathLike,
    output_postfix: str = "seg",
    output_ext: str = "auto",
    image_key: str = "image",
    output_format: str | None = None,
) -> list[dict]:
    """
    Give every item the path of its prediction (``item["output_path"]``), always under ``output_dir``:
    ``<output_dir>/<sub-folders below the inputs' common folder>/<input name>_<output_postfix><ext>``. Inputs that
    would share a name (``a.nii.gz`` and ``a.dcm``, or a series folder ``a``) are told apart by their source type
    (``a_nii_seg.nii.gz``, ``a_dcm_seg.nii.gz``, ``a_series_seg.nii.gz``). ``output_format`` (``auto``, ``nifti``,
    ``png``, ``dicom_seg``), when given, sets the ending instead of ``output_ext``; ``dicom_seg`` needs DICOM inputs.

    Raises:
        ValueError: ``output_postfix`` is empty, or a prediction would be written into a folder that holds an input
            (``output_dir`` equal to or inside an input folder, or around one so that the mirrored sub-folders meet
            an input folder), or into an input DICOM series folder; the message names both. ``output_format``
            ``dicom_seg`` with inputs that are not DICOM (named).
    """
    if not output_postfix:
        raise ValueError("output_postfix must not be empty (a prediction must never take an input's name).")
    if output_format not in (None, ""):
        output_ext = output_format_ext(output_format)
        items = check_dicom_seg_inputs(items, output_format, image_key)
    out_root = check_output_dir(items, output_dir, image_key)
    images = [os.path.abspath(os.fspath(item[image_key])) for item in items]
    parents = [os.path.dirname(p.rstrip(os.sep)) for p in images]
    common = os.path.commonpath(parents) if parents else ""
    input_folders = set(parents)
    series_folders = {Path(p) for p in images if os.path.isdir(p)}
    planned: dict[Path, list[int]] = {}
    for i, (image, parent) in enumerate(zip(images, parents)):
        name = f"{image_stem(image)}_{output_postfix}{prediction_ext(image, output_ext)}"
        planned.setdefault(out_root / os.path.relpath(parent, common) / name, []).append(i)
    paths: list[Path] = [Path()] * len(images)
    for path, members in planned.items():
        for i in members:
            if len(members) == 1:
                paths[i] = Path(os.path.normpath(path))
            else:
                stem = image_stem(images[i])
                tagged = f"{stem}_{_source_tag(images[i])}{path.name[len(stem):]}"
                paths[i] = Path(os.path.normpath(path.with_name(tagged)))
    if len(set(paths)) != len(paths):
        dupes = sorted({str(p) for p in paths if paths.count(p) > 1})
        raise ValueError(f"several inputs would be written to {dupes[0]}: rename one of them.")
    for image, path in zip(images, paths):
        if str(path.parent) in input_folders:
            raise ValueError(
                f"the prediction of {image} would be written to {path.parent}, a folder holding inputs; choose an "
                f"`output_dir` outside the input folders (it is {out_root})."
            )
        inside = [s for s in series_folders if s == path.parent or s in path.parents]
        if inside:
            raise ValueError(f"the prediction {path} would be written inside the input DICOM series folder {inside[0]}.")
    return [{**dict(item), OUTPUT_PATH_KEY: str(path)} for item, path in zip(items, paths)]
