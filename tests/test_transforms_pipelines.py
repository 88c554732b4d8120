"""The ready-made 2-D and 3-D pre-training pipelines on synthetic data of all ten modalities."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset

from dex_monai.data import MODALITIES, expand_datalist, load_datalist, make_synthetic_dataset, select_entries
from dex_monai.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    pretrain_2d_augment_transforms,
    pretrain_2d_load_transforms,
    pretrain_2d_transforms,
    pretrain_3d_transforms,
)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return load_datalist(make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_per_modality=1, size=48))


def test_2d_pipeline_every_modality(items):
    xform = pretrain_2d_transforms(img_size=32)
    xform.set_random_state(0)
    seen = set()
    for item in items:
        out = xform(item)
        assert set(out) == {"image", "modality", "modality_index"}
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
        assert type(out["image"]) is torch.Tensor and torch.isfinite(out["image"]).all()
        assert out["modality"] == item["modality"] and out["modality_index"] == MODALITIES.index(item["modality"])
        seen.add(out["modality"])
    assert seen == set(MODALITIES)


def test_imagenet_normalisation_is_last(items):
    plain = pretrain_2d_transforms(img_size=32, mean=None, std=None, affine_prob=0.0, flip_prob=0.0)
    norm = pretrain_2d_transforms(img_size=32, affine_prob=0.0, flip_prob=0.0)
    item = next(i for i in items if i["modality"] == "fundus")
    plain.set_random_state(5)
    norm.set_random_state(5)
    a, b = plain(item)["image"], norm(item)["image"]
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(b, (a - mean) / std, atol=1e-5)


def test_load_part_then_augment_part(items):
    ct = next(i for i in items if i["modality"] == "CT")
    loaded = pretrain_2d_load_transforms()(ct)
    assert loaded["image"].shape == (1, 48, 48) and "slice_index" in loaded
    assert 0.0 <= float(loaded["image"].min()) and float(loaded["image"].max()) <= 1.0
    fixed = pretrain_2d_load_transforms()({**ct, "slice_index": 12})
    assert fixed["slice_index"] == 12
    out = pretrain_2d_augment_transforms(16)(loaded)
    assert out["image"].shape == (3, 16, 16)


def test_2d_pipeline_in_a_dataloader(items):
    ds = Dataset(expand_datalist(items), transform=pretrain_2d_transforms(img_size=24))
    batch = next(iter(DataLoader(ds, batch_size=5, num_workers=0)))
    assert batch["image"].shape == (5, 3, 24, 24)
    assert batch["modality_index"].tolist() == [MODALITIES.index(m) for m in batch["modality"]]


def test_3d_pipeline(items):
    volumes = select_entries(items, dim=3)
    assert {v["modality"] for v in volumes} == {"CT", "PET", "MR"}
    xform = pretrain_3d_transforms(roi_size=(32, 32, 16))
    for v in volumes:
        out = xform(v)
        assert out["image"].shape == (1, 32, 32, 16) and out["image"].dtype == torch.float32
        assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
        assert out["modality"] == v["modality"]
    many = pretrain_3d_transforms(roi_size=64, num_samples=2)(volumes[0])  # padded: roi larger than the volume
    assert isinstance(many, list) and len(many) == 2 and many[0]["image"].shape == (1, 64, 64, 64)
    resampled = pretrain_3d_transforms(roi_size=16, pixdim=(3.0, 3.0, 3.0))(volumes[0])
    assert resampled["image"].shape == (1, 16, 16, 16)


def test_strictness_of_the_pipeline(tmp_path, items):
    png = next(i for i in items if i["modality"] == "photo")
    nameless = {"image": png["image"]}  # no modality, no rule
    with pytest.raises(RuntimeError) as info:
        pretrain_2d_transforms(16)(nameless)
    assert "cannot tell the modality" in str(info.value.__cause__)
    out = pretrain_2d_transforms(16, rules={"*/photo/*": "photo"})(nameless)
    assert out["modality"] == "photo"
