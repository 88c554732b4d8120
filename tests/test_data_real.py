"""Checks on the real scans of ``../shared/data`` (required where the folder exists, skipped elsewhere).

Every folder is indexed with the right modality; the TotalSegmentator CT series (JPEG 2000) decodes to
HU and its CT window matches the formula; the DICOM reader cases (palette, multi-frame, RGB/YBR,
MONOCHROME1, 16-bit) read correctly; corrupt and truncated copies are rejected with their reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dex_monai.data import (
    ModalityRules,
    SliceDataset,
    UnknownModalityError,
    build_datalist,
    expand_datalist,
)
from dex_monai.transforms import (
    DetectModalityd,
    LoadMultiModalImaged,
    ModalityNormalized,
    pretrain_2d_transforms,
    pretrain_3d_transforms,
)

REPO = Path(__file__).resolve().parents[1]
RULES_FILE = REPO / "configs" / "modality_rules_shared_data.yaml"


@pytest.fixture(scope="module")
def shared_index(shared_data) -> dict:
    """The whole shared data folder indexed once (pixels checked), with the shipped rule file."""
    stamps = {str(p): p.stat().st_mtime_ns for p in shared_data.rglob("*") if p.is_file()}
    datalist = build_datalist([shared_data], rules=ModalityRules.load(RULES_FILE), progress=False)
    assert {str(p): p.stat().st_mtime_ns for p in shared_data.rglob("*") if p.is_file()} == stamps
    return datalist


@pytest.fixture(scope="module")
def load():
    return LoadMultiModalImaged()


def _rel(root: Path, path: str) -> str:
    return Path(path).relative_to(root).as_posix()


# folder prefix -> (modality, number of training entries)
EXPECTED_FOLDERS = {
    "ct/totalseg_dicom/series": ("CT", 1),
    "ct/totalseg_nifti/": ("CT", 2),
    "mr/totalseg_nifti/": ("MR", 1),
    "mr/hippocampus/imagesTr/": ("MR", 195),
    "mr/pgbm001_dicom/": ("MR", 4),
    "us/busi/": ("ultrasound", 586),
    "em/isbi2012/image/": ("pathology", 30),
    "medmnist/breastmnist.npz": ("ultrasound", 3),
    "medmnist/pneumoniamnist.npz": ("X-ray", 3),
    "medmnist/adrenalmnist3d.npz": ("CT", 3),
    "mixed/sam_med2d/images/amos_0507": ("MR", 1),
    "mixed/sam_med2d/images/amos_000": ("CT", 2),
    "mixed/sam_med2d/images/s0": ("CT", 2),
}

EXPECTED_DICOM_SINGLE = {
    "693_UNCR.dcm": "CT",
    "MR-SIEMENS-DICOM-WithOverlays.dcm": "MR",
    "MR2_J2KR.dcm": "MR",
    "OBXXXX1A.dcm": "ultrasound",
    "RG1_J2KI.dcm": "X-ray",
    "RG3_J2KR.dcm": "X-ray",
    "US1_J2KR.dcm": "ultrasound",
    "US1_UNCR.dcm": "ultrasound",
    "emri_small.dcm": "MR",
    "gdcm-US-ALOKA-16.dcm": "ultrasound",
}


def test_every_folder_indexed_with_its_modality(shared_data, shared_index):
    entries = [(_rel(shared_data, e["image"]), e) for e in shared_index["training"]]
    claimed = set()
    for prefix, (modality, count) in EXPECTED_FOLDERS.items():
        found = [(p, e) for p, e in entries if p.startswith(prefix)]
        assert len(found) == count, f"{prefix}: {len(found)} entries, expected {count}"
        assert {e["modality"] for _, e in found} == {modality}, prefix
        claimed.update(p for p, _ in found)
    singles = {Path(p).name: e for p, e in entries if p.startswith("dicom_single/")}
    assert {k: e["modality"] for k, e in singles.items()} == EXPECTED_DICOM_SINGLE
    assert all(e["modality_source"] == "dicom" for e in singles.values())
    claimed.update(f"dicom_single/{k}" for k in singles)
    assert claimed == {p for p, _ in entries}, "entries outside the expected folders"
    # every top-level folder of the README has usable images
    assert {p.split("/")[0] for p, _ in entries} == {"ct", "mr", "us", "em", "medmnist", "mixed", "dicom_single"}


def test_what_is_not_an_image_is_reported(shared_data, shared_index):
    rejected = {_rel(shared_data, r["path"]): r for r in shared_index["rejected"]}
    assert rejected["dicom_single/JPEG2000_UNC.dcm"]["category"] == "unknown modality"  # NM
    assert "'NM'" in rejected["dicom_single/JPEG2000_UNC.dcm"]["reason"]
    assert rejected["dicom_single/SC_rgb.dcm"]["category"] == "unknown modality"  # OT
    assert rejected["README.md"]["category"] == "unsupported"
    assert len(rejected) == 3
    labels = {_rel(shared_data, lab["label"]) for lab in shared_index["label_files"]}
    assert "dicom_single/liver.dcm" in labels  # DICOM SEG
    assert "ct/totalseg_dicom/segmentation.nii.gz" in labels and "ct/totalseg_nifti/example_seg.nii.gz" in labels
    assert sum(lab.startswith("mr/pgbm001_dicom/MaskTumor/") for lab in labels) == 24
    assert sum(lab.startswith("mr/hippocampus/labelsTr/") for lab in labels) == 195
    hippo = next(e for e in shared_index["training"] if "hippocampus_001" in e["image"])
    assert hippo["label"].endswith("labelsTr/hippocampus_001.nii.gz")


def test_without_rules_nothing_is_guessed(shared_data):
    out = build_datalist(
        [shared_data / "mixed" / "sam_med2d", shared_data / "ct" / "totalseg_nifti", shared_data / "em"],
        progress=False,
    )
    assert out["numTraining"] == 0
    assert len(out["rejected"]) == 5 + 2 + 30
    assert {r["category"] for r in out["rejected"]} == {"unknown modality"}


def test_totalsegmentator_series_decodes_to_hu(shared_data, shared_index, load):
    entry = next(e for e in shared_index["training"] if e["format"] == "dicom-series" and e["modality"] == "CT")
    assert entry["transfer_syntax"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert entry["size"] == [512, 512, 20] and entry["spacing"][2] == pytest.approx(2.0, abs=0.05)
    d = load(entry)
    hu = d["image"]
    assert hu.shape == (1, 512, 512, 20)
    assert float(hu.min()) == -1024.0 and 1000 < float(hu.max()) < 3072  # air ... bone, in HU
    assert float(hu[0, :5, :5, :].mean()) < -900  # the corners are air
    # the same slice decoded by pydicom (pylibjpeg) and rescaled by hand
    files = sorted((shared_data / "ct" / "totalseg_dicom" / "series").glob("*.dcm"))
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    ds = pydicom.dcmread(files[int(np.argsort(positions)[7])])
    by_hand = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    itk_slice = hu[0, :, :, 7].numpy().T  # [x, y] -> [rows, cols]; ITK sorts the slices by position
    np.testing.assert_array_equal(itk_slice, by_hand)
    # the label map of the same series has the same grid
    import nibabel as nib

    assert nib.load(shared_data / "ct" / "totalseg_dicom" / "segmentation.nii.gz").shape == (512, 512, 20)
    # the CT window matches the formula
    d = DetectModalityd()(d)
    assert (d["modality"], d["modality_source"]) == ("CT", "dicom")
    out = ModalityNormalized()(d)["image"]
    expected = torch.clamp((hu + 200.0) / 600.0, 0.0, 1.0)
    assert torch.allclose(out.as_tensor(), expected.as_tensor(), atol=1e-6)
    assert out.meta["normalization"] == "window[-200,400]"


def test_dicom_reader_cases(shared_data, load):
    single = shared_data / "dicom_single"

    def read(name):
        return load({"image": str(single / name)})["image"]

    pal = read("OBXXXX1A.dcm")  # PALETTE COLOR, 8-bit indices, 16-bit LUT
    assert pal.shape == (3, 800, 600) and pal.meta["intensity_range"] == [0.0, 65535.0]
    assert float((pal[0] - pal[2]).abs().max()) > 0  # really colour
    aloka = read("gdcm-US-ALOKA-16.dcm")  # 16-bit palette
    assert aloka.shape == (3, 640, 480) and float(aloka.max()) > 255
    ybr = read("US1_J2KR.dcm")  # JPEG 2000 lossless, YBR_RCT
    rgb = read("US1_UNCR.dcm")  # the same image uncompressed
    assert ybr.shape == rgb.shape == (3, 640, 480)
    assert torch.equal(ybr.as_tensor(), rgb.as_tensor())
    multi = read("emri_small.dcm")  # 10 frames
    assert multi.shape == (1, 64, 64, 10)
    mono1 = read("RG3_J2KR.dcm")  # MONOCHROME1, 10 bits stored: inverted in the stored range
    raw = pydicom.dcmread(single / "RG3_J2KR.dcm").pixel_array
    assert mono1.meta["intensity_range"] == [0.0, 1023.0]
    np.testing.assert_array_equal(mono1[0].numpy(), (1023 - raw).T.astype(np.float32))
    ct = read("693_UNCR.dcm")
    assert float(ct.min()) == -3024.0  # rescaled to HU
    j2k = read("MR2_J2KR.dcm")
    assert j2k.shape == (1, 1024, 1024) and float(j2k.max()) > 0
    with pytest.raises(UnknownModalityError, match=r"JPEG2000_UNC\.dcm.*'NM'"):
        DetectModalityd()({"image": str(single / "JPEG2000_UNC.dcm")})


def test_medmnist_layout(shared_data, shared_index, load):
    stack = next(e for e in shared_index["training"] if e["image"].endswith("breastmnist.npz") and e["split"] == "train")
    assert stack["num_images"] == 546 and stack["label_key"] == "train_labels" and stack["size"] == [28, 28]
    images = expand_datalist([stack])
    assert len(images) == 546
    img = load(images[10])["image"]
    with np.load(stack["image"], allow_pickle=False) as z:
        np.testing.assert_array_equal(img[0].numpy(), z["train_images"][10].T.astype(np.float32))
    vol = next(e for e in shared_index["training"] if e["image"].endswith("adrenalmnist3d.npz") and e["split"] == "val")
    out = pretrain_3d_transforms(roi_size=16)(expand_datalist([vol])[0])
    assert out["image"].shape == (1, 16, 16, 16) and out["modality"] == "CT"


def test_2d_pipeline_on_every_format(shared_data, shared_index):
    xform = pretrain_2d_transforms(img_size=32)
    xform.set_random_state(0)
    done = set()
    for entry in expand_datalist(shared_index["training"]):
        key = (entry["format"], entry["modality"])
        if key in done:
            continue
        done.add(key)
        out = xform(entry)
        assert out["image"].shape == (3, 32, 32) and torch.isfinite(out["image"]).all(), entry["image"]
        assert out["modality"] == entry["modality"]
    assert {f for f, _ in done} == {"dicom", "dicom-series", "nifti", "png", "npz"}


def test_slice_cache_on_real_volumes(shared_data, shared_index, tmp_path):
    chosen = [
        e
        for e in shared_index["training"]
        if e["format"] == "dicom-series" or e["image"].endswith(("example_ct_sm.nii.gz", "hippocampus_001.nii.gz"))
    ]
    first = SliceDataset(chosen[:3], cache_dir=tmp_path, progress=False)
    assert first.decoded_units == 3 and len(first) > 0
    again = SliceDataset(chosen[:3], cache_dir=tmp_path, progress=False)
    assert again.decoded_units == 0 and len(again) == len(first)
    assert torch.equal(again[len(again) // 2]["image"], first[len(first) // 2]["image"])


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_corrupt_and_truncated_copies_are_rejected(shared_data, tmp_path):
    src = tmp_path / "copies"
    (src / "good").mkdir(parents=True)
    (src / "bad").mkdir()
    good = {
        "ct.nii.gz": shared_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz",
        "us.png": shared_data / "us" / "busi" / "benign" / "benign (1).png",
        "breast.npz": shared_data / "medmnist" / "breastmnist.npz",
        "ct.dcm": shared_data / "dicom_single" / "693_UNCR.dcm",
    }
    for name, path in good.items():
        shutil.copy(path, src / "good" / name)
        shutil.copy(path, src / "bad" / ("trunc_" + name))
        _truncate(src / "bad" / ("trunc_" + name))
    shutil.copytree(shared_data / "ct" / "totalseg_dicom" / "series", src / "good_series")
    shutil.copytree(shared_data / "ct" / "totalseg_dicom" / "series", src / "bad_series")
    victim = sorted((src / "bad_series").glob("*.dcm"))[5]
    _truncate(victim, keep=0.9)
    (src / "bad" / "empty.nii.gz").write_bytes(b"")
    (src / "bad" / "garbage.png").write_bytes(os.urandom(2048))
    ds = pydicom.dcmread(shared_data / "dicom_single" / "US1_J2KR.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless  # a compression nobody here can decode
    ds.save_as(src / "bad" / "jpegls.dcm", enforce_file_format=True)
    (src / "bad" / "table.csv").write_text("a,b\n1,2\n")
    before = {str(p): p.read_bytes() for p in src.rglob("*") if p.is_file()}

    rules = ModalityRules([("*.nii.gz", "CT"), ("*.png", "ultrasound"), ("*.npz", "ultrasound")])
    out = build_datalist([src], rules=rules, progress=False)
    assert {str(p): p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # sources untouched

    got = {(_rel(src, e["image"]), e.get("npz_key")) for e in out["training"]}
    assert {p for p, _ in got} == {"good/ct.nii.gz", "good/us.png", "good/breast.npz", "good/ct.dcm", "good_series"}
    rejected = {_rel(src, r["path"]): r for r in out["rejected"]}
    expected = {
        "bad/trunc_ct.nii.gz": "truncated",
        "bad/trunc_us.png": "truncated",
        "bad/trunc_breast.npz": "truncated",
        "bad/trunc_ct.dcm": "truncated",
        "bad/empty.nii.gz": "empty",
        "bad/garbage.png": "corrupt",
        "bad/jpegls.dcm": "unreadable compression",
        "bad/table.csv": "unsupported",
        "bad_series": "truncated",
    }
    assert {k: r["category"] for k, r in rejected.items()} == expected
    assert victim.name in rejected["bad_series"]["reason"]  # the series names its bad file
    assert "JPEG-LS" in rejected["bad/jpegls.dcm"]["reason"] and "1.2.840.10008.1.2.4.80" in rejected["bad/jpegls.dcm"]["reason"]
    # the loader names the file and the transfer syntax too
    from dex_monai.data import ImageDecodeError

    with pytest.raises(ImageDecodeError, match=r"jpegls\.dcm.*JPEG-LS Lossless"):
        LoadMultiModalImaged()({"image": str(src / "bad" / "jpegls.dcm")})
