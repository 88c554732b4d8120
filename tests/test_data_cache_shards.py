"""The persistent slice cache's sharded layout: hashed folders, bounded shard files, cached reads equal to decoding."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dex_monai.data import SliceCache, SliceDataset, load_datalist, make_synthetic_dataset
from dex_monai.data.cache import CACHE_VERSION
from dex_monai.transforms.io import LoadMultiModalImage


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("synthetic")
    path = make_synthetic_dataset(root, n_per_modality=2, size=24, modalities=("CT", "MR", "X-ray"))
    return load_datalist(path)


def test_layout_two_hashed_levels_and_bounded_shards(tmp_path):
    per_shard = 3
    cache = SliceCache(tmp_path, slices_per_shard=per_shard)
    rng = np.random.default_rng(0)
    stored = {}
    for u in range(40):
        key = hashlib.sha1(str(u).encode()).hexdigest()
        # 7 slices: five of one shape then two of another (a shard never mixes shapes)
        slices = [(2 * i, rng.random((1, 4, 4 if i < 5 else 5)).astype(np.float32)) for i in range(7)]
        cache.put(key, slices, {"image": f"u{u}"})
        stored[key] = slices
    root = Path(tmp_path) / f"v{CACHE_VERSION}"
    for key, slices in stored.items():
        unit = root / key[:2] / key[2:4] / key
        shards = sorted(unit.glob("shard_*.npy"))
        # by hand: shapes (4,4) x5 -> [3, 2], shapes (4,5) x2 -> [2]
        assert [np.load(f, allow_pickle=False).shape for f in shards] == [(3, 1, 4, 4), (2, 1, 4, 4), (2, 1, 4, 5)]
        assert sorted(os.listdir(unit)) == ["manifest.json"] + [f.name for f in shards]
        for sid, arr in slices:
            assert np.array_equal(cache.get(key, sid), arr)
    # no folder holds more than K entries: hash levels hold only 2-hex-digit folders (<= 256), units <= 1 + ceil(7/3)
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if depth < 2:
            assert not files and all(len(d) == 2 and int(d, 16) >= 0 for d in dirs)
        elif depth == 2:
            assert not files and all(len(d) == 40 for d in dirs)
        else:
            assert not dirs and len(files) <= 1 + math.ceil(7 / per_shard)


def test_cached_reads_equal_uncached_reads(items, tmp_path, monkeypatch):
    uncached = SliceDataset(items, cache_dir=None, progress=False)  # decoded, kept in memory
    first = SliceDataset(items, cache_dir=tmp_path, progress=False, slices_per_shard=4)
    assert first.decoded_units == len(items) and len(first) == len(uncached) > len(items)
    assert max(np.load(f, mmap_mode="r").shape[0] for f in Path(tmp_path).rglob("shard_*.npy")) == 4

    def boom(self, *args, **kwargs):
        raise AssertionError("decoded an image although it is cached")

    monkeypatch.setattr(LoadMultiModalImage, "__call__", boom)
    cached = SliceDataset(items, cache_dir=tmp_path, progress=False, slices_per_shard=4)
    assert cached.decoded_units == 0
    for i in range(len(uncached)):
        a, b = uncached[i], cached[i]
        assert (a["filename"], a["slice_index"], a["modality"]) == (b["filename"], b["slice_index"], b["modality"])
        assert torch.equal(a["image"], b["image"])


def test_old_layout_is_rebuilt(items, tmp_path):
    old = tmp_path / "v1" / "ab" / ("ab" * 20)
    old.mkdir(parents=True)
    (old / "manifest.json").write_text('{"version": 1, "slices": [0]}')
    np.save(old / "00000.npy", np.zeros((1, 2, 2), np.float32))
    ds = SliceDataset(items[:2], cache_dir=tmp_path, progress=False)
    assert ds.decoded_units == 2  # decoded again into the current layout, nothing read from v1
    assert (old / "00000.npy").is_file() and (tmp_path / f"v{CACHE_VERSION}").is_dir()
    assert torch.equal(ds[0]["image"], SliceDataset(items[:2], cache_dir=None, progress=False)[0]["image"])
