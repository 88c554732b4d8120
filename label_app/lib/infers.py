# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""MONAI Label inference task for a DEX segmentation bundle (its working copy, see :mod:`lib.bundles`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping

from monailabel.tasks.infer.bundle import BundleInferTask

from lib.bundles import apply_overrides, is_initial

logger = logging.getLogger(__name__)


class Label2Dd:
    """
    Last step of a 2D model: the label map ``[1, *spatial]`` gets the study's shape on disk back (a slice stored
    as ``[H, W, 1]`` keeps its singleton axis, see ``dex_monai.transforms.restore_spatial_shape``), loses its
    channel axis, and carries the study's affine for MONAI Label's writer (used for 3-axis outputs, e.g. NIfTI).
    """

    def __init__(self, key: str = "pred", ref_key: str = "image"):
        self.key, self.ref_key = key, ref_key

    def __call__(self, data):
        from dex_monai.transforms import restore_spatial_shape
        from monai.data import MetaTensor

        d = dict(data)
        ref = d.get(self.ref_key)
        meta = dict(ref.meta) if isinstance(ref, MetaTensor) else dict(d.get(f"{self.ref_key}_meta_dict") or {})
        pred = restore_spatial_shape(d[self.key], meta)
        affine = pred.affine if isinstance(pred, MetaTensor) else meta.get("original_affine")
        d[self.key] = pred[0] if pred.shape[0] == 1 else pred
        d[f"{self.key}_meta_dict"] = {"affine": affine}
        return d


class DexBundleInferTask(BundleInferTask):
    """
    :class:`BundleInferTask` reading ``configs/inference.json`` of a working copy, with the app's overrides
    (``repo_root``, the per-model ``--conf overrides``) applied before anything is parsed.

    What MONAI Label takes from the bundle: ``network_def`` (weights from ``models/model.pt``), ``preprocessing``
    (its ``LoadImaged`` reads the study), ``inferer`` (sliding window), ``postprocessing`` (softmax, ``Invertd``
    back to the study's grid, argmax; the bundle's ``SaveImaged`` is dropped, MONAI Label writes the result),
    and from ``metadata.json`` the labels (``network_data_format.outputs.pred.channel_def``, background left out)
    and the dimension (length of ``inputs.image.spatial_shape``).
    """

    def __init__(self, path: str, conf: Dict[str, str], overrides: Mapping[str, Any], repo_root: Path, **kwargs):
        self._dex_overrides = dict(overrides)
        self._dex_repo_root = Path(repo_root)
        super().__init__(path, conf, **kwargs)
        if self.is_valid() and self.dimension == 2:
            # MONAI Label's Restored resizes to the last two axes of the study's shape on disk, which is wrong for
            # a slice stored as [H, W, 1]; 2D models end with Label2Dd instead
            self.add_post_restore = False

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        # as `monai.bundle run` does: the metadata under `_meta_`, which the configs reference (e.g. label names)
        parser.read_meta(str(Path(path) / "configs" / "metadata.json"))
        apply_overrides(parser, self._dex_overrides, Path(path), self._dex_repo_root)
        return parser

    # MONAI Label puts the study's path in ``data["image_path"]`` (a string) for its writer, while MONAI 1.6's
    # ``Spacingd`` updates every ``image_*`` entry of the data as a metadata dictionary; keep such strings out
    # of the transforms' way and put them back afterwards.
    def _stash(self, data: Dict[str, Any]) -> Dict[str, Any]:
        prefix = f"{self.input_key}_"
        keys = [k for k in data if isinstance(k, str) and k.startswith(prefix) and isinstance(data[k], str)]
        return {k: data.pop(k) for k in keys}

    def _without_path_strings(self, run, data, transforms):
        stashed = self._stash(data)
        try:
            out = run(data, transforms)
        finally:
            data.update(stashed)
        out.update(stashed)
        return out

    def run_pre_transforms(self, data, transforms):
        return self._without_path_strings(super().run_pre_transforms, data, transforms)

    def run_post_transforms(self, data, transforms):
        return self._without_path_strings(super().run_post_transforms, data, transforms)

    def post_transforms(self, data=None):
        # MONAI Label writes the result itself: drop the bundle's own writers too (e.g. SavePredictiond),
        # not only MONAI's SaveImaged, so that inference never writes files into the bundle
        post = [t for t in super().post_transforms(data) if not type(t).__name__.startswith("Save")]
        if self.dimension == 2:
            post.append(Label2Dd(self.key_pred, ref_key=self.key_image))
        return post

    def writer(self, data, extension=None, dtype=None):
        # a label map: one byte per voxel (the bundles have far fewer than 256 classes); the label of a DICOM
        # file is NIfTI (with the image's geometry), not a DICOM image
        path = str(data.get("image_path") or "")
        if extension is None and not data.get("result_extension") and path.lower().endswith(".dcm"):
            extension = ".nii.gz"
        return super().writer(data, extension=extension, dtype=dtype or "uint8")

    def info(self) -> Dict[str, Any]:
        i = super().info()
        model_pt = Path(self.bundle_path) / "models" / "model.pt"
        i["bundle"] = Path(self.bundle_path).name
        i["untrained"] = is_initial(model_pt)
        if i["untrained"]:
            i["description"] = (
                f"{i.get('description') or ''} [UNTRAINED: initial weights; run training on labelled studies first]"
            ).strip()
        return i
