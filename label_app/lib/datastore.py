# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
The app's datastore: MONAI Label's local datastore over a studies folder, plus DICOM series and guards.

- Images are the files directly in the studies folder with a known extension (NIfTI, NRRD, PNG/JPEG/TIFF,
  single-file DICOM ``*.dcm``) and, in addition, **DICOM series**: every sub-folder holding ``.dcm`` files
  (one series per folder) is one image whose id is the folder name.  A series is converted once with ITK
  to a NIfTI file in a cache folder outside the studies folder (re-converted when its files change); that
  NIfTI is what viewers download and what inference and training read, so labels have its geometry.
- Labels are kept where MONAI Label keeps them: ``<studies>/labels/<tag>/<image id>.<ext>``.
- The user's images are never modified or deleted: removing an image through the API is refused, an
  upload may not replace an existing file, and ids and tags that would leave the studies folder are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

logger = logging.getLogger(__name__)

#: file patterns of images in the studies folder (MONAI Label's defaults plus single-file DICOM)
DEFAULT_EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd", "*.dcm", "*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]*$")


def is_dicom_series(path: Path) -> bool:
    """A folder holding DICOM files (``dex_monai.data.readers.is_dicom_series_folder``, the one definition), other
    than the labels folder."""
    from dex_monai.data.readers import is_dicom_series_folder

    return Path(path).name != "labels" and is_dicom_series_folder(path)


_PICTURES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def image_dimension(path) -> Optional[int]:
    """2 or 3 for a study file or DICOM series folder (from its header), None when unknown."""
    p = Path(path)
    name = p.name.lower()
    try:
        if p.is_dir():
            return 3
        if name.endswith(_PICTURES):
            return 2
        if name.endswith((".nii", ".nii.gz", ".nrrd")):
            if name.endswith(".nrrd"):
                import nrrd

                shape = nrrd.read_header(str(p))["sizes"]
            else:
                import nibabel as nib

                shape = nib.load(str(p)).shape
            return 3 if len([s for s in shape[:3] if s > 1]) >= 3 else 2
        if name.endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            return 3 if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else 2
    except Exception as e:  # unreadable: let training report it
        logger.warning(f"cannot tell the dimension of {p}: {e}")
    return None


def _series_signature(folder: Path) -> str:
    entries = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
    )
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()


def convert_dicom_series(folder: Path, out: Path) -> Path:
    """Convert the DICOM series in ``folder`` to the NIfTI file ``out`` (cached by the folder's file list)."""
    sig_file = out.with_name(out.name + ".sig")
    signature = _series_signature(folder)
    if out.is_file() and sig_file.is_file() and sig_file.read_text() == signature:
        return out
    import itk

    from dex_monai.data.readers import check_dicom_series

    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"converting DICOM series {folder} -> {out}")
    try:
        names = itk.GDCMSeriesFileNames.New(Directory=str(folder))
        uids = names.GetSeriesUIDs()
        if not uids:
            raise ValueError("no DICOM series found")
        if len(uids) > 1:
            logger.warning(f"{folder} holds {len(uids)} DICOM series; using the first ({uids[0]})")
        files = names.GetFileNames(uids[0])
        check_dicom_series(folder, files)  # a gap or uneven spacing is refused, not read with wrong geometry
        image = itk.imread([str(f) for f in files]) if len(files) > 1 else itk.imread(str(files[0]))
    except Exception as e:
        raise ValueError(f"cannot read the DICOM series in {folder}: {e}") from e
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.nii.gz")
    itk.imwrite(image, str(tmp), compression=True)
    os.replace(tmp, out)
    sig_file.write_text(signature)
    return out


class DexLocalDatastore(LocalDatastore):
    """:class:`LocalDatastore` that also lists DICOM series folders and protects the user's images."""

    def __init__(
        self,
        studies: str,
        cache_dir: str,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        auto_reload: bool = True,
        read_only: bool = False,
    ):
        self._studies_root = Path(studies).resolve()
        key = hashlib.sha1(str(self._studies_root).encode()).hexdigest()[:12]
        self._dicom_cache = Path(cache_dir) / f"{self._studies_root.name}-{key}"
        # "*/*.dcm" matches no file of the studies folder itself; it makes the file watcher (auto reload)
        # notice DICOM files arriving in series folders
        super().__init__(
            str(self._studies_root),
            extensions=[*extensions, "*/*.dcm"],
            auto_reload=auto_reload,
            read_only=read_only,
        )

    # --- DICOM series folders as images ----------------------------------------------------------------
    def _image_dir(self) -> Path:
        return Path(self._datastore.image_path()).resolve()

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        if Path(path).resolve() == self._image_dir():
            for entry in sorted(Path(path).iterdir()):
                if is_dicom_series(entry):
                    files[entry.name] = entry.name
        return files

    def _to_id(self, file: str):
        if "/" not in file and (self._image_dir() / file).is_dir():
            return file, ""
        return super()._to_id(file)

    def _series_folder(self, image_id: str) -> Optional[Path]:
        obj = self._datastore.objects.get(image_id)
        if obj is None or obj.image.ext != "":
            return None
        folder = self._image_dir() / image_id
        return folder if folder.is_dir() else None

    def get_image_uri(self, image_id: str) -> str:
        folder = self._series_folder(image_id)
        if folder is None:
            return super().get_image_uri(image_id)
        return str(convert_dicom_series(folder, self._dicom_cache / f"{image_id}.nii.gz"))

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        info = super().get_image_info(image_id)
        if info and self._series_folder(image_id) is not None:
            info["dicom_series"] = str(self._image_dir() / image_id)
            info["path"] = self.get_image_uri(image_id)
        return info

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        items = super().datalist(full_path=True)
        for item in items:
            image = Path(item["image"])
            if image.is_dir() and image.parent == self._image_dir():
                item["image"] = self.get_image_uri(image.name)
        return items

    # --- guards ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_name(kind: str, name: str) -> None:
        if not name or not _SAFE_NAME.match(name) or ".." in name:
            raise HTTPException(status_code=400, detail=f"invalid {kind} {name!r}: use letters, digits, '.', '_', '-'")

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        new_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = image_id or new_id
        self._check_name("image id", image_id)
        dest = self._image_dir() / f"{image_id}{ext}"
        if image_id in self._datastore.objects or dest.exists():
            detail = f"image {image_id!r} already exists; the studies folder's images are not replaced"
            raise HTTPException(status_code=409, detail=detail)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(
            status_code=403,
            detail=f"removing images is disabled: this server never deletes the studies folder's images ({image_id!r})",
        )

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self._check_name("label tag", label_tag)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._check_name("label tag", label_tag)
        return super().remove_label(label_id, label_tag)
