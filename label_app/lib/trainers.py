# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""MONAI Label training task for a DEX segmentation bundle (its working copy, see :mod:`lib.bundles`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping

from monailabel.tasks.train.bundle import BundleTrainTask

from lib.bundles import INITIAL_MARKER, KEY_REPO_ROOT, apply_overrides
from lib.datastore import image_dimension

logger = logging.getLogger(__name__)


class DexBundleTrainTask(BundleTrainTask):
    """
    :class:`BundleTrainTask` running ``configs/train.json`` of a working copy on the datastore's final labels.

    MONAI Label replaces ``train#dataset#data`` / ``validate#dataset#data`` with the labelled studies,
    ``train#trainer#max_epochs`` with the request's ``max_epochs`` and puts a ``CheckpointLoader`` of the current
    ``models/model.pt`` in ``train#handlers`` (``pretrained``: continue from the served model).  On top of that
    this task

    - keeps the labelled studies of the model's dimension (3D volumes or 2D pictures / slices),
    - applies the app's overrides (``repo_root`` and the per-model ``--conf overrides``) to the run,
    - sets the bundle's ``epochs`` (the length of its learning-rate schedule) to ``max_epochs``,
    - validates on the training studies when the split leaves no validation study (one labelled study), so that
      the bundle's validation ``CheckpointSaver`` still writes ``models/model.pt``,
    - and, should the run end without writing ``models/model.pt`` (e.g. a NaN validation metric), installs the
      run's final checkpoint as ``models/model.pt``, so the next inference always uses the new weights.
    """

    def __init__(self, path: str, conf: Dict[str, str], overrides: Mapping[str, Any], repo_root: Path, **kwargs):
        self._dex_overrides = dict(overrides)
        self._dex_repo_root = Path(repo_root)
        super().__init__(path, conf, **kwargs)

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        apply_overrides(parser, self._dex_overrides, Path(path), self._dex_repo_root)
        return parser

    def config(self):
        c = super().config()
        c["max_epochs"] = int(self._dex_overrides.get("epochs", c.get("max_epochs", 50)))
        return c

    def _fetch_datalist(self, request, datastore):
        # one studies folder may hold 3D volumes and 2D pictures: train each model on the studies of its dimension
        want = self._dimension()
        keep, skipped = [], []
        for item in super()._fetch_datalist(request, datastore):
            dim = image_dimension(item["image"])
            (keep if dim in (None, want) else skipped).append(item)
        if skipped:
            names = ", ".join(os.path.basename(str(i["image"])) for i in skipped)
            logger.info(f"{len(skipped)} labelled studies are not {want}D and are left out: {names}")
        return keep

    def _dimension(self) -> int:
        with open(Path(self.bundle_path) / "configs" / "metadata.json") as f:
            image = next(iter(json.load(f)["network_data_format"]["inputs"].values()))
        return len(image.get("spatial_shape") or (0, 0, 0))

    def _partition_datalist(self, datalist, request, shuffle=False):
        if not datalist:
            raise ValueError(
                f"no labelled {self._dimension()}D study to train on: "
                "save at least one final label (Slicer: 'Submit Label') first"
            )
        train_ds, val_ds = super()._partition_datalist(datalist, request, shuffle=shuffle)
        if val_ds is not None and len(val_ds) == 0:
            logger.info("validation split is empty; validating on the training studies")
            val_ds = list(train_ds)
        if not train_ds:
            train_ds = list(val_ds or datalist)
        return train_ds, val_ds

    def _update_overrides(self, overrides):
        for key, value in self._dex_overrides.items():
            overrides.setdefault(key, value)
        overrides[KEY_REPO_ROOT] = str(self._dex_repo_root)
        overrides["epochs"] = overrides.get("train#trainer#max_epochs", self._dex_overrides.get("epochs", 1))
        return overrides

    def __call__(self, request, datastore):
        models = Path(self.bundle_path) / "models"
        model_pt = models / "model.pt"
        final_pt = models / "model_final.pt"
        before = {p: (p.stat().st_mtime_ns if p.is_file() else None) for p in (model_pt, final_pt)}
        result = super().__call__(request, datastore)

        def changed(p: Path) -> bool:
            return p.is_file() and p.stat().st_mtime_ns != before[p]

        if not changed(model_pt) and changed(final_pt):
            logger.warning(f"training wrote no new {model_pt.name}; installing the run's final weights instead")
            tmp = model_pt.with_suffix(".pt.tmp")
            shutil.copy2(final_pt, tmp)
            os.replace(tmp, model_pt)
            os.utime(model_pt)
        if changed(model_pt):
            (models / INITIAL_MARKER).unlink(missing_ok=True)
            logger.info(f"new model: {model_pt}")
        else:
            raise RuntimeError(f"training finished without writing {model_pt}")
        return result
