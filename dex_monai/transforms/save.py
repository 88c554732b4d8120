# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Writing predictions to the paths planned for them (:func:`dex_monai.data.outputs.plan_outputs`)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from dex_monai.data.outputs import (
    OUTPUT_PATH_KEY,
    prediction_ext,
)
from dex_monai.data.dicom_seg import write_dicom_seg
from dex_monai.data.readers import image_stem
from dex_monai.transforms.downstream import restore_spatial_shape

__all__ = ["SavePredictiond"]


def _ras_affine(affine: Any, meta: Mapping) -> np.ndarray:
    """The 4x4 RAS affine of a prediction from its affine (a 2D 3x3 one is embedded) and its meta ``space``."""
    affine = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine, dtype=torch.float64))
    if affine.shape != (4, 4):
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    if str(meta.get("space", "RAS")).upper() == "LPS":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


class SavePredictiond(MapTransform):
    """
    Write label maps, each to the path planned for its input (``item["output_path"]``, see
    :func:`dex_monai.data.outputs.plan_outputs`: always under the output folder, never beside an input), in the
    format its ending names (:func:`~dex_monai.data.outputs.prediction_ext`: with ``"auto"`` a PNG / JPEG input gets
    a PNG prediction of the same size, anything else NIfTI). NIfTI is written with nibabel and the input's shape and
    affine (a slice stored as ``[H, W, 1]`` keeps its singleton axis and 4x4 affine, see
    :func:`restore_spatial_shape`); ``.dcm`` as a DICOM Segmentation of the DICOM input (one segment per label,
    named by ``label_names``, see :func:`~dex_monai.data.dicom_seg.write_dicom_seg`); other endings through MONAI's
    writer for that ending.

    Items without a planned path (e.g. the evaluation of a training datalist) are written flat into ``output_dir`` as
    ``<input name>_<output_postfix><ext>``; a name written twice in one run, or one that is an input, is refused.
    With ``argmax`` a multi-channel prediction (one-hot or probabilities) is written as its label map. The item
    itself is left unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "./predictions",
        output_postfix: str = "seg",
        output_ext: str = "auto",
        output_dtype: Any = np.uint8,
        ref_key: str = "image",
        argmax: bool = False,
        output_path_key: str = OUTPUT_PATH_KEY,
        label_names: Mapping[Any, str] | None = None,
        algorithm_name: str = "dex_monai",
        algorithm_version: str = "0",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not output_postfix:
            raise ValueError("output_postfix must not be empty (predictions must never replace their inputs).")
        self.output_dir = Path(os.path.abspath(os.fspath(output_dir)))
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.output_dtype = output_dtype
        self.ref_key = ref_key
        self.argmax = argmax
        self.output_path_key = output_path_key
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        self._written: set[Path] = set()

    def _fallback_path(self, name: str) -> Path:
        path = self.output_dir / f"{image_stem(name)}_{self.output_postfix}{prediction_ext(name, self.output_ext)}"
        if path in self._written or (name and path == Path(os.path.abspath(name))):
            raise ValueError(f"{name}: its prediction {path} would overwrite another output or an input.")
        return path

    def _write_nifti(self, pred: torch.Tensor, affine: Any, meta: Mapping, path: Path) -> None:
        import nibabel as nib

        array = pred[0].detach().cpu().numpy().astype(self.output_dtype)
        nib.save(nib.Nifti1Image(array, _ras_affine(affine, meta)), str(path))

    def _write_dicom_seg(self, pred: torch.Tensor, affine: Any, meta: Mapping, series_uid: Any, path: Path) -> None:
        name = meta.get("filename_or_obj")
        if not name:
            raise ValueError(f"{path}: a DICOM SEG needs the DICOM input it references; the prediction names none.")
        write_dicom_seg(
            pred[0].detach().cpu().numpy(),
            _ras_affine(affine, meta),
            str(name),
            path,
            self.label_names,
            series_uid=None if series_uid in (None, "") else str(series_uid),
            algorithm_name=self.algorithm_name,
            algorithm_version=self.algorithm_version,
        )

    def _write_other(self, pred: torch.Tensor, affine: Any, path: Path) -> None:
        from monai.data.image_writer import resolve_writer

        writer = resolve_writer(path.name.split(".", 1)[-1])[0](output_dtype=self.output_dtype, scale=None)  # labels
        writer.set_data_array(pred, channel_dim=0, squeeze_end_dims=True)
        write_meta = {"spatial_shape": tuple(pred.shape[1:])}
        if affine is not None:
            write_meta["affine"] = affine
        writer.set_metadata(write_meta, resample=False)
        writer.write(str(path), verbose=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d.get(self.ref_key)
        for key in self.key_iterator(d):
            pred = d[key]
            if self.argmax and pred.shape[0] > 1:
                pred = pred.argmax(0, keepdim=True) if isinstance(pred, torch.Tensor) else pred.argmax(0)[None]
            meta = dict(pred.meta) if isinstance(pred, MetaTensor) else {}
            if not meta.get("filename_or_obj") and isinstance(ref, MetaTensor):
                meta = dict(ref.meta)
            pred = restore_spatial_shape(torch.as_tensor(pred) if not isinstance(pred, torch.Tensor) else pred, meta)
            affine = pred.affine if isinstance(pred, MetaTensor) else meta.get("affine")
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            if pred.shape[0] != 1:
                raise ValueError(f"SavePredictiond writes label maps [1, *spatial], got {tuple(pred.shape)}; set argmax.")
            name = str(meta.get("filename_or_obj", ""))
            planned = d.get(self.output_path_key)
            path = Path(planned) if planned else self._fallback_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.name.lower().endswith((".nii", ".nii.gz")):
                self._write_nifti(pred, affine, meta, path)
            elif path.name.lower().endswith(".dcm"):
                self._write_dicom_seg(pred, affine, meta, d.get("series_uid"), path)
            else:
                self._write_other(pred, affine, path)
            self._written.add(path)
        return d
