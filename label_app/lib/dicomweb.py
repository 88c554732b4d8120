# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
The app's datastore for a DICOMweb server (a PACS such as Orthanc): MONAI Label's own DICOMweb datastore, plus
clear errors for series that are not on the server.

MONAI Label's :class:`DICOMWebDatastore` lists the series matching ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` (QIDO-RS),
downloads a series (WADO-RS) into a cache and converts it to NIfTI for inference, and turns a saved final label
into a DICOM SEG (dcmqi's ``itkimage2segimage``) that it stores back on the server (STOW-RS).  Here an image id
(a SeriesInstanceUID) that the server does not know is answered with HTTP 404 instead of an unhandled error, and
nothing is downloaded at start-up (MONAI Label would fetch dcmqi from GitHub; the label environment installs it
from PyPI).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any, Dict

from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

logger = logging.getLogger(__name__)

#: the dcmqi tool that MONAI Label runs to write a label as DICOM SEG
DCMQI_TOOL = "itkimage2segimage"


class DexDICOMWebDatastore(DICOMWebDatastore):
    """:class:`DICOMWebDatastore` that answers unknown series ids with HTTP 404."""

    def require_series(self, image_id: str) -> None:
        """Raise HTTP 404 unless the DICOMweb server has the series ``image_id`` (one QIDO-RS query)."""
        if not image_id:
            raise HTTPException(status_code=400, detail="no image given: pass a SeriesInstanceUID of the server")
        try:
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        except Exception as e:  # the server refused the query (e.g. a malformed UID)
            logger.warning(f"QIDO-RS query for series {image_id!r} failed: {e}")
            found = []
        if not any(s.get("0020000E", {}).get("Value") == [image_id] for s in found):
            raise HTTPException(
                status_code=404,
                detail=f"series {image_id!r} is not on the DICOMweb server {self.name()}; "
                "GET /datastore/ counts the listed series, the viewer (OHIF, Slicer) shows their ids",
            )

    def get_image_uri(self, image_id: str) -> str:
        self.require_series(image_id)
        return super().get_image_uri(image_id)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = ""
    ) -> str:
        self.require_series(image_id)
        return super().save_label(image_id, label_filename, label_tag, label_info, label_id)


def dicomweb_datastore(url: str, default_cache_path: str) -> DexDICOMWebDatastore:
    """MONAI Label 0.8.5's DICOMweb datastore set-up (``MONAILabelApp._init_dicomweb_datastore``), with the guarded
    datastore, its cache in ``default_cache_path`` unless ``MONAI_LABEL_DICOMWEB_CACHE_PATH`` is set, and no
    download of dcmqi.  The ``MONAI_LABEL_DICOMWEB_*`` settings (search filter, user/password, QIDO/WADO/STOW
    prefixes, fetch by frame) apply as in MONAI Label; Google Cloud Healthcare URLs use its credentials."""
    url = url.rstrip("/").strip()
    logger.info(f"Using DICOMweb: {url}")
    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        client: DICOMwebClient = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        session = None
        user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        if user and password:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(user, password)
        client = DICOMwebClientX(
            url=url,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
    if shutil.which(DCMQI_TOOL) is None:
        logger.error(
            f"{DCMQI_TOOL} (dcmqi) is not on PATH: saving labels to the DICOMweb server will fail; install it with "
            "bash scripts/setup_label_env.sh (pip package dcmqi) and start the server with scripts/label_server.sh"
        )
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or default_cache_path
    return DexDICOMWebDatastore(
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )
