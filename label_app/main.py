# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
MONAI Label app serving the project's DEX segmentation bundles (``bundles/dex_seg3d``, ``bundles/dex_seg2d``).

Start it with ``scripts/label_server.sh --studies DIR|DICOMWEB_URL`` (see docs/monai_label.md).  The bundles are
read from this repository, never downloaded.  Options (``--conf KEY VALUE``):

==================  =====================================================================================
``models``          comma-separated bundle names to serve; default: those of ``dex_seg3d``, ``dex_seg2d``
                    present in ``bundles_dir``
``bundles_dir``     folder of the bundles; default ``<repo>/bundles``
``work_dir``        working copies of the bundles (their ``models/model.pt`` is what training writes and
                    inference reads) and the DICOM conversion cache; default ``<app>/model``
``overrides``       bundle-key overrides per model: inline JSON or a .json/.yaml file, e.g.
                    ``{"dex_seg3d": {"roi_size": [64, 64, 64], "num_workers": 0}}`` (see lib/bundles.py)
``preload``         ``true``: load the networks when the server starts (default ``false``)
``skip_trainers``   ``true``: serve inference only
==================  =====================================================================================
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict

from fastapi import HTTPException

import monailabel
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

from lib.bundles import ensure_model, overrides_for, parse_overrides, select_models, sync_working_copy
from lib.datastore import DexLocalDatastore
from lib.dicomweb import dicomweb_datastore
from lib.errors import describe, is_image_read_error
from lib.infers import DexBundleInferTask
from lib.trainers import DexBundleTrainTask

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parent


class DexLabelApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        self.repo_root = REPO_ROOT
        self.bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles").expanduser().resolve()
        self.work_dir = Path(conf.get("work_dir") or Path(app_dir) / "model").expanduser().resolve()
        self.overrides = parse_overrides(conf.get("overrides"))

        self.bundles: Dict[str, Path] = {}
        self.model_state: Dict[str, dict] = {}
        explicit = bool((conf.get("models") or "").strip()) and conf.get("models", "").strip() != "all"
        for name, src in select_models(self.bundles_dir, conf.get("models")).items():
            try:
                work = sync_working_copy(src, self.work_dir / name)
                self.model_state[name] = ensure_model(name, work, src, overrides_for(self.overrides, name), REPO_ROOT)
            except Exception as e:
                if explicit:
                    raise
                logger.exception(f"{name}: cannot serve bundle {src}; skipping it ({e})")
                continue
            self.bundles[name] = work
        logger.info(f"DEX bundles: { {n: str(p) for n, p in self.bundles.items()} }")

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"DEX segmentation (dex_monai; MONAI Label {monailabel.__version__})",
            description="Director-Experts (DEX) segmentation bundles of dex_monai, served from the local repository",
            version="0.1.0",
        )

    # --- MONAI Label hooks -----------------------------------------------------------------------------
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return super().init_datastore()  # MONAI Label's own
            # a DICOMweb server (e.g. Orthanc, see docs/monai_label.md): MONAI Label's DICOMweb datastore, its
            # cache of downloaded series under work_dir unless MONAI_LABEL_DICOMWEB_CACHE_PATH says otherwise
            return dicomweb_datastore(self.studies, str(self.work_dir / ".dicomweb_cache"))
        return DexLocalDatastore(
            self.studies,
            cache_dir=str(self.work_dir / ".dicom_cache"),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, work in self.bundles.items():
            task = DexBundleInferTask(str(work), self.conf, overrides_for(self.overrides, name), REPO_ROOT)
            if task.is_valid():
                infers[name] = task
            else:
                logger.error(f"{name}: bundle {work} is not usable by MONAI Label (see the warnings above)")
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, work in self.bundles.items():
            task = DexBundleTrainTask(str(work), self.conf, overrides_for(self.overrides, name), REPO_ROOT)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    # --- clear errors for bad requests -----------------------------------------------------------------
    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; available models: {sorted(self._infers)}"
            )
        image = request.get("image")
        if isinstance(image, str):
            ds = datastore if datastore else self.datastore()
            if not image:
                raise HTTPException(status_code=400, detail="no image given: pass ?image=<image id> or upload a file")
            if os.path.exists(image):
                # a file path: MONAI Label's own uploads (temporary files) and sessions, nothing else
                if not self._is_served_path(image):
                    raise HTTPException(
                        status_code=403,
                        detail="give an image id of the datastore (GET /datastore/?output=all) or upload the file",
                    )
            else:
                try:
                    uri = ds.get_image_uri(image)
                except HTTPException:
                    raise
                except Exception as e:  # e.g. a DICOM series that cannot be converted
                    raise HTTPException(status_code=422, detail=f"cannot read image {image!r}: {describe(e)}") from e
                if not uri:
                    raise HTTPException(
                        status_code=404,
                        detail=f"image {image!r} is not in the datastore ({self.studies}); "
                        "GET /datastore/?output=all lists the image ids",
                    )
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except Exception as e:
            logger.exception(f"inference with {model} on {image!r} failed")
            if is_image_read_error(e):
                raise HTTPException(
                    status_code=422, detail=f"cannot read image {image!r} (corrupt or unsupported file): {describe(e)}"
                ) from e
            detail = f"inference with {model} on {image!r} failed: {describe(e)}"
            raise HTTPException(status_code=500, detail=detail) from e

    def _is_served_path(self, path: str) -> bool:
        # the temporary folder is the server's own (scripts/label_server.sh gives it a private TMPDIR): uploads land there
        roots = [tempfile.gettempdir(), self.studies, str(self.work_dir)]
        sessions = getattr(self, "_sessions", None)
        if sessions is not None and getattr(sessions, "store_path", None):
            roots.append(sessions.store_path)
        real = os.path.realpath(path)
        return any(real.startswith(os.path.realpath(r).rstrip(os.sep) + os.sep) for r in roots if r)

    def bundle_path(self, model):
        # asked by MONAI Label before it starts a training (or batch) task: refuse unknown models up front
        if model and model not in self._trainers and model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"unknown model {model!r}; trainable models: {sorted(self._trainers)}"
            )
        return super().bundle_path(model)
