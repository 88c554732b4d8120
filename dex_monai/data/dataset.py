"""Datalists and the 2-D slice dataset with its persistent cache."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dex_monai.data.cache import SLICES_PER_SHARD, SliceCache, slice_cache_key
from dex_monai.data.checks import RejectedFile
from dex_monai.data.datalist import load_datalist
from dex_monai.data.detect import DetectModality
from dex_monai.data.failures import describe_failure
from dex_monai.data.loader import LoadMultiModalImage
from dex_monai.data.modality import (
    MODALITIES,
    ModalityRules,
    canonical_modality,
    modality_index,
)
from dex_monai.data.normalization import (
    ModalityNormalize,
    load_normalization_config,
    normalization_config_hash,
)
from dex_monai.data.slicing import slice_volume

__all__ = ["load_datalist", "expand_datalist", "select_entries", "SliceDataset"]


def expand_datalist(items: Sequence[Mapping[str, Any]], volumes: bool = False, slice_axis: int = 2) -> list[dict]:
    """One item per image: npz stacks (``num_images > 1``) get ``npz_index``; with ``volumes=True``
    3-D entries get one item per slice (``slice_index`` along ``slice_axis``, no foreground filter)."""
    out: list[dict] = []
    for item in items:
        n = int(item.get("num_images", 1) or 1)
        bases = [dict(item)] if "num_images" not in item else [{**item, "npz_index": i, "num_images": 1} for i in range(n)]
        for base in bases:
            if volumes and int(base.get("dim", 2)) == 3 and base.get("size"):
                depth = int(base["size"][slice_axis])
                out.extend({**base, "slice_index": z} for z in range(depth))
            else:
                out.append(base)
    return out


def select_entries(
    items: Sequence[Mapping[str, Any]], modalities: Sequence[str] | None = None, dim: int | None = None
) -> list[dict]:
    """Entries of the given modalities (any spelling) and/or dimensionality (2 or 3)."""
    wanted = None if modalities is None else {canonical_modality(m) for m in modalities}
    if wanted is not None and None in wanted:
        raise ValueError(f"unknown modality in {modalities}; the DEX modalities are {MODALITIES}.")
    return [
        dict(e)
        for e in items
        if (wanted is None or canonical_modality(e.get("modality")) in wanted)
        and (dim is None or int(e.get("dim", 2)) == dim)
    ]


_ON_ERROR = {"stop": "stop", "raise": "stop", "skip": "skip", "warn": "skip"}


class SliceDataset(Dataset):
    """2-D pre-training dataset over a multi-modality datalist, backed by a persistent slice cache.

    On construction every unit (2-D image, 3-D volume, image of an npz stack) that is not yet in the
    cache is decoded once, normalised for its modality (whole volume), cut into 2-D slices along
    ``slice_axis`` keeping those with enough foreground (CT, MR >= 0.05; PET >= 0.01), and stored;
    units already cached are not decoded again (later epochs and later runs read ``.npy`` slices).

    ``dataset[i]`` is ``{"image": float32 tensor [C, S0, S1] in [0, 1], "modality": str,
    "modality_index": int, "filename": str, "slice_index": int}`` passed through ``transform``
    (e.g. :func:`dex_monai.transforms.pretrain_2d_augment_transforms`).

    Args:
        data: datalist items (``image`` path, ``modality`` and the index's fields), e.g. from
            :func:`load_datalist`.
        transform: applied to each slice item (random augmentation).
        cache_dir: persistent cache folder; ``None`` keeps the slices in memory.
        slice_axis: spatial axis (0, 1, 2) along which volumes are sliced.
        norm_config: normalisation config (YAML path, mapping or ``None`` for the defaults).
        rules: modality rules for items without a DICOM tag or a ``modality`` entry.
        on_error: ``"stop"`` (default; alias ``"raise"``): the first unusable unit stops with a
            :class:`~dex_monai.data.checks.RejectedFile` naming the file and the reason; ``"skip"`` (alias
            ``"warn"``): it is left out with a warning and listed in :attr:`failed` as ``(path, reason)``.
        progress: tqdm progress bar while preparing.
        slices_per_shard: slices stacked in one cache file at most (:class:`~dex_monai.data.SliceCache`).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        cache_dir: str | os.PathLike | None = None,
        slice_axis: int = 2,
        norm_config: str | os.PathLike | Mapping[str, Any] | None = None,
        rules: ModalityRules | str | os.PathLike | None = None,
        on_error: str = "stop",
        progress: bool = True,
        slices_per_shard: int = SLICES_PER_SHARD,
    ) -> None:
        if str(on_error).lower() not in _ON_ERROR:
            raise ValueError(f"on_error must be 'stop' ('raise') or 'skip' ('warn'), got {on_error!r}.")
        self.transform = transform
        self.slice_axis = int(slice_axis)
        self.norm_config = load_normalization_config(norm_config)  # defaults completed, validated
        self.config_hash = normalization_config_hash(self.norm_config)
        self.cache = SliceCache(cache_dir, slices_per_shard=slices_per_shard)
        self.on_error = _ON_ERROR[str(on_error).lower()]
        self._detect = DetectModality(rules=rules, strict=True)
        self._loader = LoadMultiModalImage()
        self.failed: list[tuple[str, str]] = []
        self.decoded_units = 0  # units decoded by this instance (0 when everything came from the cache)
        self._units: list[tuple[str, dict]] = []  # (cache key, item)
        self._slices: list[tuple[int, int]] = []  # (unit position, slice id)
        self._modalities: list[str] = []
        self._prepare(list(data), progress)

    # -- preparation ---------------------------------------------------------------------------
    def _modality_of(self, item: Mapping[str, Any]) -> str:
        declared = item.get("modality")
        if item.get("modality_source") == "dicom" and canonical_modality(declared):
            return canonical_modality(declared)  # type: ignore[return-value]
        src = item.get("source")
        modality, _ = self._detect(
            os.fspath(item["image"]),
            declared=declared,
            series_uid=item.get("series_uid"),
            root=src if isinstance(src, str) and os.path.isdir(src) else None,
        )
        return modality

    def _units_of(self, item: Mapping[str, Any]) -> list[dict]:
        n = int(item.get("num_images", 1) or 1)
        if "num_images" in item and item.get("npz_index") is None:
            if int(item.get("dim", 2)) == 3:
                return [{**item, "npz_index": i, "num_images": 1} for i in range(n)]
            return [{**item, "stack_size": n}]  # a 2-D stack is one unit whose slices are its images
        return [dict(item)]

    def _decode(self, item: Mapping[str, Any], modality: str) -> list[tuple[int, np.ndarray]]:
        normalize = ModalityNormalize(self.norm_config)
        suv = True if str(item.get("units", "")).upper() in ("SUV", "GML") or item.get("suv") else None
        path = os.fspath(item["image"])
        if "stack_size" in item:
            out = []
            for i in range(int(item["stack_size"])):
                img = self._loader(path, npz_key=item.get("npz_key"), npz_index=i)
                out.append((i, normalize(img, modality, suv=suv).numpy().astype(np.float32, copy=False)))
            return out
        img = self._loader(path, series_uid=item.get("series_uid"), npz_key=item.get("npz_key"), npz_index=item.get("npz_index"))
        norm = normalize(img, modality, suv=suv)
        arr = norm.numpy().astype(np.float32, copy=False)
        if arr.ndim == 3:
            return [(0, np.ascontiguousarray(arr))]
        return slice_volume(arr, modality, axis=self.slice_axis, config=self.norm_config)

    def _prepare(self, items: list[dict], progress: bool) -> None:
        from tqdm.auto import tqdm

        units = [u for item in items for u in self._units_of(item)]
        for unit in tqdm(units, desc="preparing slices", unit="image", disable=not progress):
            path = os.fspath(unit["image"])
            try:
                modality = self._modality_of(unit)
                key = slice_cache_key(
                    unit, modality, self.slice_axis, self.config_hash, extra={"stack_size": unit.get("stack_size")}
                )
                manifest = self.cache.manifest(key)
                if manifest is None:
                    slices = self._decode(unit, modality)
                    self.decoded_units += 1
                    manifest = self.cache.put(key, slices, {"image": path, "modality": modality})
            except Exception as e:
                if self.on_error == "stop":
                    if isinstance(e, RejectedFile):  # the checked loader's rejections already name the file
                        raise e.with_path(path)
                    if str(path) not in str(e):
                        e.add_note(f"while preparing {path}")
                    raise
                reason = describe_failure(e, path, stage="prepare")["reason"]
                warnings.warn(f"SliceDataset: skipping {path}: {reason}", stacklevel=2)
                self.failed.append((path, reason))
                continue
            pos = len(self._units)
            self._units.append((key, {"filename": path, "modality": modality}))
            for sid in manifest["slices"]:
                self._slices.append((pos, int(sid)))
                self._modalities.append(modality)

    # -- access --------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """The modality of every slice (for :class:`~dex_monai.data.ModalityBalancedSampler`)."""
        return list(self._modalities)

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, index: int) -> Any:
        pos, sid = self._slices[index]
        key, info = self._units[pos]
        arr = self.cache.get(key, sid)
        item = {
            "image": torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)),
            "modality": info["modality"],
            "modality_index": modality_index(info["modality"]),
            "filename": info["filename"],
            "slice_index": sid,
        }
        return self.transform(item) if self.transform is not None else item
