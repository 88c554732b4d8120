"""Persistent cache of decoded, normalised 2-D slices (sharded ``.npy`` stacks, no pickle).

Layout: ``<cache_dir>/v<version>/<key[:2]>/<key[2:4]>/<key>/{manifest.json, shard_00000.npy, ...}``: two levels of
hashed folders (at most 256 entries each, so millions of units spread over 65,536 leaf folders) and, per unit,
shard files of at most ``slices_per_shard`` slices stacked ``[n, C, S0, S1]`` (read back memory-mapped, one slice
at a time), so that millions of slices live neither in one file nor in one folder. The key hashes the
source path, its size and modification time (every file of a DICOM series folder), the item options
(series, npz array and index), the modality, the slice axis and the normalisation config, so that a
changed file or config is decoded again and a stale slice is never served. A unit is written into a
temporary folder then renamed into place, so parallel workers / DDP ranks can share a cache folder.
A cache of an older layout (``v1``: one ``.npy`` per slice) is left alone and rebuilt under ``v2`` on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["CACHE_VERSION", "SLICES_PER_SHARD", "source_signature", "slice_cache_key", "SliceCache"]

CACHE_VERSION = 2
#: slices stacked in one shard file at most (a 3-D volume of 300 slices gives 5 files)
SLICES_PER_SHARD = 64
_MANIFESTS_KEPT = 4096  # manifests remembered per process (they map a slice id to its shard and row)


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

    Each unit (key) holds ``{slice_id: float32 array [C, S0, S1]}`` and a manifest (JSON) with the slice ids, their
    shard and row, and facts about the source. Consecutive slices of one shape are stacked, ``slices_per_shard`` at
    most, in ``shard_<n>.npy`` files read with ``np.load(..., mmap_mode="r", allow_pickle=False)``.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, slices_per_shard: int = SLICES_PER_SHARD) -> None:
        if slices_per_shard < 1:
            raise ValueError(f"slices_per_shard must be at least 1, got {slices_per_shard}.")
        self.cache_dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"v{CACHE_VERSION}")
        self.slices_per_shard = int(slices_per_shard)
        self._memory: dict[str, tuple[dict, dict[int, np.ndarray]]] = {}
        self._rows: OrderedDict[str, dict[int, tuple[int, int]]] = OrderedDict()
        if self.cache_dir is not None:
            os.makedirs(self.cache_dir, exist_ok=True)

    def _dir(self, key: str) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, key[:2], key[2:4], key)

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

    def _shards(self, slices: Sequence[tuple[int, np.ndarray]]) -> list[list[int]]:
        """Positions in ``slices`` grouped into shards: consecutive, one shape, ``slices_per_shard`` at most."""
        shards: list[list[int]] = []
        for pos, (_, arr) in enumerate(slices):
            last = shards[-1] if shards else None
            if last is None or len(last) == self.slices_per_shard or slices[last[0]][1].shape != arr.shape:
                shards.append([pos])
            else:
                last.append(pos)
        return shards

    def put(self, key: str, slices: Sequence[tuple[int, np.ndarray]], info: Mapping[str, Any] | None = None) -> dict:
        """Store the slices of one unit; returns its manifest."""
        shards = self._shards(slices)
        rows = [[0, 0]] * len(slices)
        for n, members in enumerate(shards):
            for row, pos in enumerate(members):
                rows[pos] = [n, row]
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "slices": [int(i) for i, _ in slices],
            "shapes": [list(a.shape) for _, a in slices],
            "rows": rows,  # [shard, row] of each slice
            **(dict(info) if info else {}),
        }
        if self.cache_dir is None:
            self._memory[key] = (manifest, {int(i): np.asarray(a, dtype=np.float32) for i, a in slices})
            return manifest
        final = self._dir(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f".{key[:8]}-")
        try:
            for n, members in enumerate(shards):
                stack = np.stack([np.asarray(slices[pos][1], dtype=np.float32) for pos in members])
                np.save(os.path.join(tmp, f"shard_{n:05d}.npy"), stack)
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

    def _row(self, key: str, slice_id: int) -> tuple[int, int]:
        rows = self._rows.get(key)
        if rows is None:
            manifest = self.manifest(key)
            if manifest is None:
                raise KeyError(f"slice cache unit {key} is not stored in {self.cache_dir}")
            rows = {int(i): (int(n), int(r)) for i, (n, r) in zip(manifest["slices"], manifest["rows"])}
            self._rows[key] = rows
            if len(self._rows) > _MANIFESTS_KEPT:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(key)
        return rows[int(slice_id)]

    def get(self, key: str, slice_id: int) -> np.ndarray:
        """One stored slice ``float32 [C, S0, S1]``."""
        if self.cache_dir is None:
            return self._memory[key][1][int(slice_id)]
        shard, row = self._row(key, slice_id)
        stack = np.load(os.path.join(self._dir(key), f"shard_{shard:05d}.npy"), mmap_mode="r", allow_pickle=False)
        return np.array(stack[row])

    def clear(self) -> None:
        """Remove everything this cache holds (the cache folder's version subfolder, or the memory store)."""
        self._memory.clear()
        self._rows.clear()
        if self.cache_dir is not None and os.path.isdir(self.cache_dir):
            shutil.rmtree(self.cache_dir)
            os.makedirs(self.cache_dir, exist_ok=True)
