"""SliceDataset and its persistent cache: decoded once, reused, invalidated by file or config changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dex_monai.data import (
    SliceCache,
    SliceDataset,
    expand_datalist,
    load_datalist,
    make_synthetic_dataset,
    select_entries,
    slice_cache_key,
)
from dex_monai.transforms import pretrain_2d_augment_transforms
from dex_monai.transforms.io import LoadMultiModalImage


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("synthetic")
    path = make_synthetic_dataset(root, n_per_modality=2, size=32, modalities=("CT", "PET", "MR", "X-ray", "fundus"))
    return load_datalist(path)


def _forbid_decoding(monkeypatch):
    def boom(self, *args, **kwargs):
        raise AssertionError("decoded an image although it is cached")

    monkeypatch.setattr(LoadMultiModalImage, "__call__", boom)


def test_slices_normalised_and_filtered(items, tmp_path):
    ds = SliceDataset(items, cache_dir=tmp_path, progress=False)
    assert ds.decoded_units == len(items)
    per = {}
    for m in ds.modalities:
        per[m] = per.get(m, 0) + 1
    depth = 16
    assert per["X-ray"] == 2 and per["fundus"] == 2
    for m in ("CT", "MR", "PET"):
        assert 0 < per[m] < 2 * depth, f"{m}: empty end slices should be dropped"
    item = ds[0]
    assert set(item) == {"image", "modality", "modality_index", "filename", "slice_index"}
    for i in range(len(ds)):
        img = ds[i]["image"]
        assert img.dtype == torch.float32 and img.ndim == 3 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    fundus = next(ds[i] for i in range(len(ds)) if ds[i]["modality"] == "fundus")
    assert fundus["image"].shape == (3, 32, 32) and fundus["modality_index"] == 5


def test_cached_epoch_does_not_decode(items, tmp_path, monkeypatch):
    first = SliceDataset(items, cache_dir=tmp_path, progress=False)
    arrays = [first[i]["image"] for i in range(len(first))]
    files = list(Path(tmp_path).rglob("*.npy"))
    assert len(files) == len(items)  # one shard per unit: no volume here has more than SLICES_PER_SHARD slices
    assert sum(np.load(f, mmap_mode="r", allow_pickle=False).shape[0] for f in files) == len(first)
    _forbid_decoding(monkeypatch)
    second = SliceDataset(items, cache_dir=tmp_path, progress=False)
    assert second.decoded_units == 0 and len(second) == len(first)
    assert all(torch.equal(second[i]["image"], arrays[i]) for i in range(len(second)))
    for f in files[:3]:  # plain arrays, readable without pickle
        assert np.load(f, allow_pickle=False).dtype == np.float32


def test_cache_invalidated_by_file_and_config_changes(items, tmp_path):
    SliceDataset(items, cache_dir=tmp_path, progress=False)
    target = next(i for i in items if i["modality"] == "CT")["image"]
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = SliceDataset(items, cache_dir=tmp_path, progress=False)
    assert again.decoded_units == 1  # only the touched file
    other = SliceDataset(items, cache_dir=tmp_path, norm_config={"modalities": {"CT": {"window": [-1000, 1000]}}}, progress=False)
    assert other.decoded_units == len(items)  # the normalisation is part of the key
    axis = SliceDataset(select_entries(items, dim=3), cache_dir=tmp_path, slice_axis=0, progress=False)
    assert axis.decoded_units == 6 and all(axis[i]["image"].shape[1:] == (32, 16) for i in range(len(axis)))


def test_cache_key_ingredients(items, tmp_path):
    item = items[0]
    base = slice_cache_key(item, "CT", 2, "abc")
    assert base == slice_cache_key(dict(item), "CT", 2, "abc")
    assert base != slice_cache_key(item, "CT", 1, "abc")
    assert base != slice_cache_key(item, "CT", 2, "abd")
    assert base != slice_cache_key(item, "MR", 2, "abc")
    assert base != slice_cache_key({**item, "npz_index": 3}, "CT", 2, "abc")


def test_memory_cache_and_transform(items):
    ds = SliceDataset(items, transform=pretrain_2d_augment_transforms(24), cache_dir=None, progress=False)
    out = ds[0]
    assert out["image"].shape == (3, 24, 24) and set(out) == {"image", "modality", "modality_index"}
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 24, 24) and len(batch["modality"]) == 4
    assert batch["modality_index"].dtype == torch.int64


def test_errors_raise_or_are_skipped(items, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    bad = [*items[:2], {"image": str(broken), "modality": "CT"}]
    with pytest.raises(Exception, match="broken.nii.gz"):
        SliceDataset(bad, progress=False)
    with pytest.warns(UserWarning, match="skipping .*broken.nii.gz"):
        ds = SliceDataset(bad, on_error="warn", progress=False)
    assert len(ds.failed) == 1 and len(ds) > 0


def test_concurrent_writers_keep_one_copy(tmp_path):
    cache = SliceCache(tmp_path)
    a = [(0, np.zeros((1, 2, 2), np.float32)), (3, np.ones((1, 2, 2), np.float32))]
    cache.put("ab" * 20, a, {"image": "x"})
    cache.put("ab" * 20, a, {"image": "x"})  # a second writer: no error, same content
    assert cache.manifest("ab" * 20)["slices"] == [0, 3]
    assert np.array_equal(cache.get("ab" * 20, 3), a[1][1])
    assert not [p for p in Path(tmp_path).rglob(".*") if p.is_dir()]  # no temporary folders left
    cache.clear()
    assert cache.manifest("ab" * 20) is None


def test_expand_and_select(tmp_path):
    entries = [
        {"image": "a.npz", "modality": "X-ray", "dim": 2, "npz_key": "train_images", "num_images": 3},
        {"image": "v.nii.gz", "modality": "CT", "dim": 3, "size": [4, 4, 5]},
        {"image": "p.png", "modality": "photo", "dim": 2},
    ]
    flat = expand_datalist(entries)
    assert [e.get("npz_index") for e in flat] == [0, 1, 2, None, None]
    slices = expand_datalist(entries, volumes=True)
    assert [e["slice_index"] for e in slices if e["image"] == "v.nii.gz"] == [0, 1, 2, 3, 4]
    assert [e["image"] for e in select_entries(entries, modalities=["ct", "Photo"])] == ["v.nii.gz", "p.png"]
    assert [e["image"] for e in select_entries(entries, dim=3)] == ["v.nii.gz"]
    with pytest.raises(ValueError, match="unknown modality"):
        select_entries(entries, modalities=["spectroscopy"])


def test_preparing_is_quick(items, tmp_path):
    t0 = time.perf_counter()
    SliceDataset(items, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t0 < 30
