"""The index with several worker processes writes the same datalist, byte for byte, as with one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dex_monai.data.index import main
from dex_monai.data.index_scan import plan_scan, scan_tasks
from dex_monai.data.synthetic import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Real PNGs and NIfTI (copied from the shared data when present), made-up PNGs, a broken file, and one folder
    holding two interleaved DICOM series (a_/b_ files sort so that a chunk of names would cut both series)."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(3)
    us = root / "us" / "busi" / "benign"
    us.mkdir(parents=True)
    real_png = sorted((SHARED / "us" / "busi" / "benign").glob("*.png"))[:6]
    real_nii = sorted((SHARED / "mr" / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]
    for src in real_png:
        shutil.copy(src, us / src.name)
    if real_nii:
        (root / "mr" / "hippocampus" / "imagesTr").mkdir(parents=True)
        for src in real_nii:
            shutil.copy(src, root / "mr" / "hippocampus" / "imagesTr" / src.name)
    for i in range(40):  # more files than one chunk: several tasks for this folder
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(us / f"made_{i:02d}.png")
    (us / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    dicom = root / "ct" / "scans"
    a = write_dicom_series(dicom, rng.integers(-500, 500, (10, 8, 7)).astype(np.int16), "CT", prefix="s_", series_uid="1.2.3.1")
    b = write_dicom_series(dicom / "tmp", rng.integers(0, 900, (10, 8, 6)).astype(np.int16), "MR", series_uid="1.2.3.2")
    for i, path in enumerate(b):  # interleave the second series' file names with the first's
        os.rename(path, dicom / f"s_{i:04d}x.dcm")
    os.rmdir(dicom / "tmp")
    assert len(a) == 7
    return root


def test_workers_write_the_same_datalist(archive, tmp_path):
    rules = ["--rule", "*us/busi/*=ultrasound", "--rule", "*mr/hippocampus/*=MR"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([str(archive), "--out", str(one), "--quiet", "--workers", "1", *rules]) == 0
    assert main([str(archive), "--out", str(two), "--quiet", "--workers", "2", *rules]) == 0
    assert one.read_bytes() == two.read_bytes()
    datalist = json.loads(one.read_text())
    series = {e["series_uid"]: e for e in datalist["training"] if e["format"] == "dicom-series"}
    # each series whole: 7 CT files and 6 MR files, as written above
    assert {uid: (e["num_files"], e["modality"]) for uid, e in series.items()} == {
        "1.2.3.1": (7, "CT"), "1.2.3.2": (6, "MR")
    }  # fmt: skip
    pngs = [e for e in datalist["training"] if e["format"] == "png"]
    real = len(list((archive / "us").rglob("*.png"))) - 1  # all but the broken one
    assert len(pngs) == real and [e["image"] for e in pngs] == sorted(e["image"] for e in pngs)
    assert [r["path"].endswith("broken.png") for r in datalist["rejected"]] == [True]
    assert datalist["numTraining"] == real + 2 + len(list((archive / "mr").rglob("*.nii.gz")))


def test_tasks_keep_dicom_folders_whole(archive):
    plan, missing = plan_scan([str(archive)], set())
    assert missing == []
    tasks = list(scan_tasks(plan, chunk_size=8))
    dicom_tasks = [t for t in tasks if any(name.endswith(".dcm") for name in t[2])]
    assert len(dicom_tasks) == 1 and len(dicom_tasks[0][2]) == 13  # both series, one task
    png_tasks = [t for t in tasks if t[1].endswith("benign")]
    n_png = len(list((archive / "us" / "busi" / "benign").glob("*.png")))
    assert [len(t[2]) for t in png_tasks] == [8] * (n_png // 8) + ([n_png % 8] if n_png % 8 else [])
    # every file in exactly one task
    listed = sorted(os.path.join(t[1], n) for t in tasks for n in t[2])
    assert listed == sorted(str(p) for p in archive.rglob("*") if p.is_file())


def test_plan_drops_files_met_twice(tmp_path):
    """A file is scanned once: a link to it, or the same folder reached through a linked folder, is left out."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (root / "z.png").symlink_to(root / "a.png")
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    plan, missing = plan_scan([str(root), str(tmp_path / "alias"), str(tmp_path / "nowhere")], set())
    assert [(folder, files) for _, folder, files in plan] == [(str(root), ["a.png"]), (str(tmp_path / "alias"), [])]
    assert missing == [str(tmp_path / "nowhere")]
