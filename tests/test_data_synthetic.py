"""The synthetic multi-modality generator: all ten modalities, plausible values, deterministic, fast."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from dex_monai.data import MODALITIES, load_datalist, make_synthetic_dataset


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_defaults_fast_complete_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    path = make_synthetic_dataset(tmp_path / "a", seed=3)
    assert time.perf_counter() - t0 < 5.0
    make_synthetic_dataset(tmp_path / "b", seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_synthetic_dataset(tmp_path / "c", seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    content = json.loads(Path(path).read_text())
    assert content["rejected"] == [] and content["summary"]["entries"] == 4 * len(MODALITIES)
    assert {e["modality"] for e in content["training"]} == set(MODALITIES)
    assert all(not Path(e["image"]).is_absolute() for e in content["training"])  # the folder can move


def test_plausible_values(tmp_path):
    items = load_datalist(make_synthetic_dataset(tmp_path, n_per_modality=1, size=48))
    by = {i["modality"]: i for i in items}
    ct = nib.load(by["CT"]["image"]).get_fdata()
    assert ct.shape == (48, 48, 24) and ct.min() >= -1024 and np.median(ct) < -900 and ct.max() > 500  # HU
    pet = nib.load(by["PET"]["image"]).get_fdata()
    assert pet.min() >= 0 and 3 < pet.max() <= 20 and by["PET"]["units"] == "SUV"
    mr = nib.load(by["MR"]["image"]).get_fdata()
    assert mr.min() >= 0 and mr.max() > 500
    for m in ("X-ray", "ultrasound", "OCT"):
        assert Image.open(by[m]["image"]).mode == "L" and by[m]["channels"] == 1
    for m in ("fundus", "pathology", "endoscopy", "photo"):
        assert Image.open(by[m]["image"]).mode == "RGB" and by[m]["channels"] == 3
    assert ct[:, :, 0].max() == ct[:, :, 0].min() or np.mean(ct[:, :, 0] > -500) < 0.05  # air at the ends


def test_subset_of_modalities(tmp_path):
    items = load_datalist(make_synthetic_dataset(tmp_path, n_per_modality=2, size=16, modalities=("fundus", "CT")))
    assert sorted(i["modality"] for i in items) == ["CT", "CT", "fundus", "fundus"]
