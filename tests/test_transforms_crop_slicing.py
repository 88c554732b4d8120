"""Random resized crop with near-black rejection; 3-D -> 2-D slicing with foreground filtering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dex_monai.transforms import (
    ExtractSlice,
    ExtractSliced,
    RandForegroundSliced,
    RandResizedCrop,
    RandResizedCropd,
    foreground_slices,
    slice_foreground_ratios,
    slice_volume,
)


def test_crop_shape_dtype_and_determinism():
    img = torch.rand(3, 120, 90)
    a = RandResizedCrop(size=32).set_random_state(7)(img)
    b = RandResizedCrop(size=32).set_random_state(7)(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    rect = RandResizedCrop(size=(16, 24)).set_random_state(0)(img)
    assert rect.shape == (3, 16, 24)
    small = RandResizedCrop(size=64).set_random_state(0)(torch.rand(1, 28, 28))  # up-sampling
    assert small.shape == (1, 64, 64)


def test_crop_boxes_follow_scale_and_ratio():
    crop = RandResizedCrop(size=16, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), min_mean=0.0).set_random_state(1)
    img = torch.ones(1, 200, 200)
    for _ in range(200):
        crop(img)
        s0, s1, l0, l1 = crop.last_box
        assert 0 <= s0 and s0 + l0 <= 200 and 0 <= s1 and s1 + l1 <= 200
        area = l0 * l1 / 200**2
        assert 0.2 - 0.01 <= area <= 1.0
        assert 3 / 4 - 0.05 <= l0 / l1 <= 4 / 3 + 0.05


def test_crop_minimum_area_relative_to_output():
    # as in the reference loader: the box is at least half the output area (no extreme up-sampling)
    crop = RandResizedCrop(size=64, scale=(0.2, 1.0), min_mean=0.0).set_random_state(3)
    img = torch.ones(1, 80, 80)
    for _ in range(100):
        crop(img)
        _, _, l0, l1 = crop.last_box
        assert l0 * l1 >= 0.5 * 64 * 64 * 0.95


def test_crop_rejects_near_black_boxes():
    img = torch.zeros(1, 200, 200)
    img[:, 150:, 150:] = 1.0  # only one bright corner
    crop = RandResizedCrop(size=16, scale=(0.05, 0.1), min_mean=0.05, max_attempts=50).set_random_state(0)
    centre = (200 - 200) // 2
    accepted = 0
    for _ in range(100):
        crop(img)
        s0, s1, l0, l1 = crop.last_box
        if (s0, s1, l0, l1) == (centre, centre, 200, 200):
            continue  # fallback
        accepted += 1
        assert float(img[:, s0 : s0 + l0, s1 : s1 + l1].mean()) >= 0.05
    assert accepted > 50


def test_crop_falls_back_to_centre_square():
    crop = RandResizedCrop(size=8, min_mean=0.05).set_random_state(0)
    out = crop(torch.zeros(1, 100, 60))
    assert crop.last_box == (20, 0, 60, 60)
    assert out.shape == (1, 8, 8)


def test_crop_dict_same_box_for_all_keys():
    img = torch.rand(3, 50, 40)
    d = RandResizedCropd(["image", "other"], size=10).set_random_state(5)({"image": img, "other": img.clone()})
    assert torch.equal(d["image"], d["other"])
    with pytest.raises(ValueError, match="channel-first 2-D"):
        RandResizedCrop(size=8)(torch.rand(1, 8, 8, 8))


def _ct_like_volume(depth=20, filled=range(5, 15), fraction=0.5) -> np.ndarray:
    vol = np.zeros((1, 40, 40, depth), dtype=np.float32)
    side = int(round(40 * math.sqrt(fraction)))
    for z in filled:
        vol[0, :side, :side, z] = 0.6
    return vol


def test_foreground_ratios_and_thresholds():
    vol = _ct_like_volume()
    ratios = slice_foreground_ratios(vol, axis=2)
    assert ratios.shape == (20,)
    assert ratios[0] == 0.0 and ratios[7] == pytest.approx(0.5, abs=0.02)
    assert foreground_slices(vol, "CT") == list(range(5, 15))
    # 3 % foreground: kept for PET (0.01), dropped for CT and MR (0.05)
    thin = _ct_like_volume(filled=[3], fraction=0.03)
    assert foreground_slices(thin, "PET") == [3]
    assert foreground_slices(thin, "CT") == []
    assert foreground_slices(thin, "MR") == []
    # other modalities are not filtered
    assert len(foreground_slices(thin, "ultrasound")) == 20
    # another axis
    assert foreground_slices(vol, "CT", axis=0) == list(range(0, 28))


def test_slice_volume_returns_normalised_2d_slices():
    vol = _ct_like_volume()
    out = slice_volume(vol, "CT")
    assert [i for i, _ in out] == list(range(5, 15))
    assert all(a.shape == (1, 40, 40) and a.dtype == np.float32 for _, a in out)


def test_extract_slice_metatensor_affine():
    affine = torch.diag(torch.tensor([0.5, 0.7, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    vol = MetaTensor(torch.rand(1, 6, 7, 8), affine=affine)
    out = ExtractSlice(axis=2)(vol, 4)
    assert out.shape == (1, 6, 7)
    assert torch.equal(out.as_tensor(), vol.as_tensor()[..., 4])
    assert torch.allclose(out.affine, torch.tensor([[0.5, 0, 10], [0, 0.7, 20], [0, 0, 1]], dtype=torch.float64))
    assert out.meta["slice_index"] == 4
    side = ExtractSlice(axis=0)(vol, 1)
    assert side.shape == (1, 7, 8)
    with pytest.raises(IndexError):
        ExtractSlice(axis=2)(vol, 8)
    d = ExtractSliced(axis=2)({"image": vol, "slice_index": 2})
    assert d["image"].shape == (1, 6, 7)
    with pytest.raises(ValueError, match="no 'slice_index'"):
        ExtractSliced()({"image": vol})


def test_rand_foreground_slice_draws_kept_slices_only():
    vol = torch.as_tensor(_ct_like_volume())
    xform = RandForegroundSliced(axis=2).set_random_state(0)
    drawn = set()
    for _ in range(60):
        d = xform({"image": vol, "modality": "CT"})
        drawn.add(d["slice_index"])
        assert d["image"].shape == (1, 40, 40)
    assert drawn <= set(range(5, 15)) and len(drawn) > 5
    # an explicit index is taken as is; a 2-D image passes unchanged
    assert xform({"image": vol, "modality": "CT", "slice_index": 0})["slice_index"] == 0
    flat = torch.rand(1, 5, 5)
    assert xform({"image": flat, "modality": "CT"})["image"] is flat
    # nothing qualifies: the slice with the most foreground
    empty = torch.zeros(1, 5, 5, 4)
    empty[0, 0, 0, 2] = 1.0
    assert xform({"image": empty, "modality": "CT"})["slice_index"] == 2
