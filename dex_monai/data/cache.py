"""Persistent cache of decoded, normalised 2-D slices (one ``.npy`` per slice, no pickle).

Layout: ``<cache_dir>/v<version>/<key[:2]>/<key>/{manifest.json, 00000.npy, ...}``. The key hashes the
source path, its size and modification time (every file of a DICOM series folder), the item options
(series, npz array and index), the modality, the slice axis and the normalisation config, so that a
changed file or config is decoded again and a stale slice is never served. A unit is written into a
temporary folder then renamed into place, so parallel workers / DDP ranks can share a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["CACHE_VERSION", "source_signature", "slice_cache_key", "SliceCache"]

CACHE_VERSION = 1


def source_signature(path: str | os.PathLike) -> list:
    """``[size, mtime_ns]`` of a file; for a folder (DICOM series) the sorted ``[name, size, mtime_ns]`` of its files."""
    if os.path.isdir(path):
        out = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file():
                st = entry.stat()
                out.append([entry.name, st.st_size, st.st_mtime_ns])
        return out
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def slice_cache_key(
    item: Mapping[str, Any], modality: str, slice_axis: int, config_hash: str, extra: Mapping[str, Any] | None = None
) -> str:
    """The cache key of one loadable unit (an image, a volume, or one image of an npz stack)."""
    path = os.path.abspath(os.fspath(item["image"]))
    payload = {
        "version": CACHE_VERSION,
        "path": path,
        "signature": source_signature(path),
        "series_uid": item.get("series_uid"),
        "npz_key": item.get("npz_key"),
        "npz_index": item.get("npz_index"),
        "units": item.get("units"),
        "suv": bool(item.get("suv", False)),
        "modality": modality,
        "slice_axis": int(slice_axis),
        "normalization": config_hash,
        **(dict(extra) if extra else {}),
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class SliceCache:
    """Store of normalised slices: on disk under ``cache_dir`` or, when ``cache_dir`` is ``None``, in memory.

    Each unit (key) holds ``{slice_id: float32 array [C, S0, S1]}`` and a manifest (JSON) with the
    slice ids and facts about the source. Arrays are read with ``np.load(..., allow_pickle=False)``.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.cache_dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"v{CACHE_VERSION}")
        self._memory: dict[str, tuple[dict, dict[int, np.ndarray]]] = {}
        if self.cache_dir is not None:
            os.makedirs(self.cache_dir, exist_ok=True)

    def _dir(self, key: str) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, key[:2], key)

    def manifest(self, key: str) -> dict | None:
        """The manifest of ``key`` or ``None`` when the unit is not cached."""
        if self.cache_dir is None:
            hit = self._memory.get(key)
            return None if hit is None else hit[0]
        path = os.path.join(self._dir(key), "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, key: str, slices: Sequence[tuple[int, np.ndarray]], info: Mapping[str, Any] | None = None) -> dict:
        """Store the slices of one unit; returns its manifest."""
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "slices": [int(i) for i, _ in slices],
            "shapes": [list(a.shape) for _, a in slices],
            **(dict(info) if info else {}),
        }
        if self.cache_dir is None:
            self._memory[key] = (manifest, {int(i): np.asarray(a, dtype=np.float32) for i, a in slices})
            return manifest
        final = self._dir(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{key[:8]}-")
        try:
            for i, arr in slices:
                np.save(os.path.join(tmp, f"{int(i):05d}.npy"), np.ascontiguousarray(arr, dtype=np.float32))
            with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump(manifest, f)
            try:
                os.rename(tmp, final)
            except OSError:  # another worker stored it first (or a stale copy): keep the existing one if complete
                if self.manifest(key) is None:
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def get(self, key: str, slice_id: int) -> np.ndarray:
        """One stored slice ``float32 [C, S0, S1]``."""
        if self.cache_dir is None:
            return self._memory[key][1][int(slice_id)]
        return np.load(os.path.join(self._dir(key), f"{int(slice_id):05d}.npy"), allow_pickle=False)

    def clear(self) -> None:
        """Remove everything this cache holds (the cache folder's version subfolder, or the memory store)."""
        self._memory.clear()
        if self.cache_dir is not None and os.path.isdir(self.cache_dir):
            shutil.rmtree(self.cache_dir)
            os.makedirs(self.cache_dir, exist_ok=True)
