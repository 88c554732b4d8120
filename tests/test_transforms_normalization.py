"""Per-modality normalisation on hand-made arrays with known values and percentiles; channel conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dex_monai.data import MODALITIES
from dex_monai.transforms import (
    DEFAULT_NORMALIZATION,
    EnsureSingleChannel,
    EnsureThreeChannel,
    EnsureThreeChanneld,
    ModalityNormalize,
    ModalityNormalized,
    load_normalization_config,
    normalization_config_hash,
)

REPO = Path(__file__).resolve().parents[1]


def _known_percentiles() -> np.ndarray:
    """1001 values 0.0, 0.1, ..., 99.9 and one outlier 1e4: the 1st percentile is 1.0, the 99th 99.0."""
    x = np.arange(1001, dtype=np.float32) / 10.0
    x[-1] = 1e4
    assert np.allclose(np.percentile(x, [1, 99]), [1.0, 99.0])
    return x.reshape(1, 7, 11, 13)


def test_ct_window_formula():
    hu = np.array([-3024, -1000, -200, -100, 0, 100, 400, 1000, 3071], dtype=np.float32).reshape(1, 3, 3)
    out = ModalityNormalize()(hu, "CT")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.clip((hu + 200.0) / 600.0, 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("modality", ["PET", "MR"])
def test_percentile_clip_and_min_max(modality):
    x = _known_percentiles()
    out = ModalityNormalize()(x, modality)
    expected = np.clip((x - 1.0) / 98.0, 0.0, 1.0)  # clip to [p1, p99] then min-max
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)


def test_pet_zscore_then_minmax_is_scale_invariant():
    x = _known_percentiles()
    a = ModalityNormalize()(x, "PET")
    b = ModalityNormalize()(3.0 * x + 50.0, "PET")  # z-score removes scale and offset
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_pet_suv_window():
    suv = np.array([-1.0, 0.0, 2.5, 10.0, 20.0, 35.0], dtype=np.float32).reshape(1, 2, 3)
    out = ModalityNormalize()(suv, "PET", suv=True)
    np.testing.assert_allclose(out, np.clip(suv, 0, 20) / 20.0, atol=1e-6)
    out_d = ModalityNormalized()({"image": suv, "modality": "PET", "units": "SUV"})["image"]
    np.testing.assert_allclose(out_d, out)
    # DICOM Units GML (g/ml, SUV body weight) in the metadata selects the SUV rule too
    mt = MetaTensor(torch.as_tensor(suv), meta={"units": "GML"})
    np.testing.assert_allclose(ModalityNormalize()(mt, "PET").numpy(), out, atol=1e-6)
    # the SUV flag means nothing for other modalities
    hu = np.array([[[0.0, 400.0]]], dtype=np.float32)
    np.testing.assert_allclose(ModalityNormalize()(hu, "CT", suv=True), [[[1 / 3, 1.0]]], atol=1e-6)


@pytest.mark.parametrize("modality", MODALITIES[3:])
def test_range_modalities_8_and_16_bit(modality):
    eight = np.array([[[0, 51, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(ModalityNormalize()(eight, modality), eight / 255.0, atol=1e-6)
    sixteen = np.array([[[0, 1000, 65535]]], dtype=np.uint16)
    np.testing.assert_allclose(ModalityNormalize()(sixteen, modality), sixteen / 65535.0, atol=1e-6)
    # 12-bit data stored in 16 bits: the stored range (2**BitsStored - 1) from the metadata
    mt = MetaTensor(torch.tensor([[[0.0, 1023.5, 4095.0]]]), meta={"intensity_range": [0.0, 4095.0]})
    out = ModalityNormalize()(mt, modality)
    assert isinstance(out, MetaTensor) and out.meta["normalization"] == "range[0,4095]"
    np.testing.assert_allclose(out.numpy(), [[[0.0, 1023.5 / 4095.0, 1.0]]], atol=1e-6)


def test_range_float_inputs():
    already = np.array([[[0.0, 0.25, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(ModalityNormalize()(already, "fundus"), already)
    other = np.array([[[-5.0, 5.0, 15.0]]], dtype=np.float32)
    np.testing.assert_allclose(ModalityNormalize()(other, "OCT"), [[[0.0, 0.5, 1.0]]])


def test_display_referred_ct_mr_pet_divide_by_range():
    png_like = np.array([[[0, 128, 255]]], dtype=np.uint8)  # an 8-bit screenshot of a CT slice
    for modality in ("CT", "MR", "PET"):
        np.testing.assert_allclose(ModalityNormalize()(png_like, modality), png_like / 255.0, atol=1e-6)
    mt = MetaTensor(torch.tensor([[[0.0, 128.0, 255.0]]]), meta={"display_referred": True, "intensity_range": [0, 255]})
    np.testing.assert_allclose(ModalityNormalize()(mt, "CT").numpy(), png_like / 255.0, atol=1e-6)
    # the same values as HU (not display-referred) are windowed
    hu = MetaTensor(torch.tensor([[[0.0, 128.0, 255.0]]]), meta={"display_referred": False})
    np.testing.assert_allclose(ModalityNormalize()(hu, "CT").numpy(), [[[200 / 600, 328 / 600, 455 / 600]]], atol=1e-6)


def test_torch_input_keeps_type_and_meta():
    mt = MetaTensor(torch.full((1, 4, 4), 100.0), meta={"filename_or_obj": "x.nii.gz"})
    out = ModalityNormalize()(mt, "CT")
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "x.nii.gz" and out.meta["normalization"] == "window[-200,400]"
    assert torch.allclose(out, torch.full((1, 4, 4), 0.5))


def test_yaml_config_matches_defaults_and_overrides(tmp_path):
    shipped = load_normalization_config(REPO / "configs" / "modality_normalization.yaml")
    assert shipped == DEFAULT_NORMALIZATION
    user = tmp_path / "norm.yaml"
    user.write_text("modalities:\n  CT: {window: [-1000, 1000]}\n  xray: {method: minmax}\n")
    cfg = load_normalization_config(user)
    assert cfg["modalities"]["CT"]["window"] == [-1000.0, 1000.0]
    assert cfg["modalities"]["CT"]["min_foreground_ratio"] == 0.05  # other keys keep the defaults
    assert cfg["modalities"]["X-ray"]["method"] == "minmax"
    assert normalization_config_hash(cfg) != normalization_config_hash(shipped)
    hu = np.array([[[-1000.0, 0.0, 1000.0]]], dtype=np.float32)
    np.testing.assert_allclose(ModalityNormalized(config=user)({"image": hu, "modality": "CT"})["image"], [[[0, 0.5, 1]]])


@pytest.mark.parametrize(
    "text, match",
    [
        ("modalities: {microscopy: {method: range}}", "microscopy"),
        ("modalities: {CT: {window: [400, -200]}}", "low < high"),
        ("modalities: {CT: {method: sigmoid}}", "method must be one of"),
        ("modalities: {CT: {windw: [0, 1]}}", "unknown keys"),
        ("colour: red", "unknown key 'colour'"),
    ],
)
def test_bad_configs_are_reported(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_normalization_config(path)


def test_normalized_needs_a_modality():
    with pytest.raises(ValueError, match="no 'modality'"):
        ModalityNormalized()({"image": np.zeros((1, 2, 2), np.float32)})


def test_three_channels_grey_rgb_alpha():
    grey = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    out = EnsureThreeChannel()(grey)
    assert out.shape == (3, 2, 3) and all(torch.equal(out[c], grey[0]) for c in range(3))
    rgb = torch.rand(3, 2, 3)
    assert torch.equal(EnsureThreeChannel()(rgb), rgb)
    rgba = torch.rand(4, 2, 3)
    assert torch.equal(EnsureThreeChannel()(rgba), rgba[:3])  # alpha dropped
    grey_alpha = np.random.rand(2, 2, 3).astype(np.float32)
    assert np.array_equal(EnsureThreeChannel()(grey_alpha), np.repeat(grey_alpha[:1], 3, 0))
    with pytest.raises(ValueError, match="cannot turn 5 channels into 3"):
        EnsureThreeChannel()(torch.rand(5, 2, 2))
    assert EnsureThreeChanneld()({"image": grey})["image"].shape == (3, 2, 3)


def test_single_channel_for_3d():
    rgb = torch.rand(3, 2, 2, 2)
    out = EnsureSingleChannel()(rgb)
    assert out.shape == (1, 2, 2, 2)
    assert torch.allclose(out[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert EnsureSingleChannel()(torch.rand(1, 2, 2, 2)).shape == (1, 2, 2, 2)


def test_one_channel_rule_for_pretraining_and_finetuning():
    """Fine-tuning's EnsureChannelsd and pre-training's EnsureSingleChannel are one rule: colour -> luma."""
    from dex_monai.transforms import EnsureChannelsd

    rgb = torch.tensor([[[1.0]], [[0.0]], [[0.0]]])  # pure red
    grey = EnsureChannelsd("image", channels=1)({"image": rgb})["image"]
    torch.testing.assert_close(grey, torch.tensor([[[0.299]]]))
    torch.testing.assert_close(grey, EnsureSingleChannel()(rgb))
    rgba = torch.rand(4, 2, 2)
    torch.testing.assert_close(EnsureChannelsd("image", channels=3)({"image": rgba})["image"], rgba[:3])


def test_modality_normalized_with_fixed_modality_plain_rule_and_standardisation():
    """The fine-tuning bundles' normalisation is pre-training's ModalityNormalized with a fixed modality (or a plain
    rule for non-DEX images) and optional per-channel standardisation."""
    hu = torch.tensor([[[-200.0, -50.0, 100.0, 400.0, 2000.0]]])
    out = ModalityNormalized("image", modality="CT")({"image": hu})["image"]
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.5, 1.0, 1.0]]]))  # window [-200, 400] HU
    item = ModalityNormalized("image", modality="CT")({"image": hu, "modality": "MR"})["image"]
    assert not torch.allclose(item, out)  # the item's own modality comes first
    em = np.array([[[0, 51, 255]]], dtype=np.uint8)
    ranged = ModalityNormalized("image", modality="range", mean=0.5, std=0.25)({"image": em})["image"]
    np.testing.assert_allclose(ranged, (np.array([[[0.0, 0.2, 1.0]]]) - 0.5) / 0.25, rtol=1e-6)
    rgb = torch.full((3, 1, 2), 255.0)
    std = ModalityNormalized("image", modality="range", mean=[0.5, 0.4, 0.3], std=[0.5, 0.5, 0.5])(
        {"image": rgb.to(torch.uint8)})["image"]
    torch.testing.assert_close(std[:, 0, 0], torch.tensor([1.0, 1.2, 1.4]))
