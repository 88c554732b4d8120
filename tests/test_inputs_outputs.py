# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
The one reader layer and the one datalist module: bad inputs are refused with the file and the reason whichever entry
point reads them (checked loader, index, pre-training dataset), Siemens mosaics become 3-D volumes, DICOM series with
a gap are refused, and predictions are planned under ``output_dir`` only.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dex_monai.data import RejectedFile, write_dicom_series
from dex_monai.data.datalist import inference_datalist, load_datalist
from dex_monai.data.outputs import check_output_dir, plan_outputs
from dex_monai.data.failures import FAILURE_KEY, FailureTolerantDataset, collate_skipping_failures
from dex_monai.data.index import build_datalist
from dex_monai.data.modality import ModalityRules
from dex_monai.transforms import LoadMultiModalImage, LoadMultiModalImaged

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers: broken files and a Siemens mosaic built from a known volume
# ----------------------------------------------------------------------------------------------
def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    nib.save(img, str(path))
    return path


def _truncated_nifti(path: Path) -> Path:
    good = path.with_name("full_" + path.name)
    _nifti(good, np.random.default_rng(0).normal(size=(20, 20, 12)).astype(np.float32))
    raw = good.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    good.unlink()
    return path


def _csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 header (the binary layout nibabel's ``csareader`` reads)."""
    out = b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, (vr, values) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77)
        for value in values:
            item = value.encode() + b"\x00"
            out += struct.pack("<4i", len(item), len(item), 77, len(item))
            out += item + b"\x00" * ((4 - len(item) % 4) % 4)
    return out


def _write_mosaic(path: Path, volume: np.ndarray, spacing=(3.25, 3.0, 3.6), ipp=(-100.0, -80.0, 10.0)) -> None:
    """``volume[x, y, z]`` tiled as Siemens does: slice k at block (k // n, k % n) of an n x n grid, rows = y."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    nx, ny, nz = volume.shape
    n = int(np.ceil(np.sqrt(nz)))
    frame = np.zeros((n * ny, n * nx), dtype=np.uint16)
    for k in range(nz):
        r, c = divmod(k, n)
        frame[r * ny : (r + 1) * ny, c * nx : (c + 1) * nx] = volume[:, :, k].T
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Rows, ds.Columns = frame.shape
    ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
    ds.SliceThickness = spacing[2]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = list(ipp)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x0029, 0x1010), "OB", _csa2({"NumberOfImagesInMosaic": ("IS", [str(nz)]),
                                                "AcquisitionMatrixText": ("SH", [f"{ny}*{nx}"])}))
    ds.PixelData = frame.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


# ----------------------------------------------------------------------------------------------
# the checked loader
# ----------------------------------------------------------------------------------------------
def test_checked_loader_names_file_and_reason(tmp_path):
    load = LoadMultiModalImage()
    cases = {
        "truncated": (_truncated_nifti(tmp_path / "trunc.nii.gz"), "truncated"),
        "nan": (_nifti(tmp_path / "nan.nii.gz", np.full((8, 8, 4), np.nan, dtype=np.float32)), "non-finite"),
        "fake png": (tmp_path / "fake.png", "corrupt"),
        "empty": (tmp_path / "empty.nii.gz", "empty"),
        "4d": (_nifti(tmp_path / "fmri.nii.gz", np.random.default_rng(1).random((6, 6, 5, 3)).astype(np.float32)),
               "unsupported"),
        "constant": (_nifti(tmp_path / "flat.nii.gz", np.ones((6, 6, 4), dtype=np.float32)), "constant"),
    }
    (tmp_path / "fake.png").write_text("this is not a picture\n")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    for what, (path, category) in cases.items():
        with pytest.raises(RejectedFile) as caught:
            load(path)
        assert caught.value.category == category, what
        assert str(path) in str(caught.value), what
    # a label map may be all background
    assert LoadMultiModalImage(constant_ok=True)(tmp_path / "flat.nii.gz").shape == (1, 6, 6, 4)


def _mosaic_volume() -> np.ndarray:
    return (np.arange(6 * 5 * 7, dtype=np.uint16).reshape(6, 5, 7) * 3 + 1).astype(np.uint16)


def test_siemens_mosaic_is_a_3d_volume(tmp_path):
    volume = _mosaic_volume()
    _write_mosaic(tmp_path / "fmri_0001.dcm", volume, spacing=(3.25, 3.0, 3.6), ipp=(-100.0, -80.0, 10.0))
    img = LoadMultiModalImage()(tmp_path / "fmri_0001.dcm")
    assert tuple(img.shape) == (1, 6, 5, 7)
    np.testing.assert_array_equal(img[0].numpy(), volume.astype(np.float32))
    affine = np.asarray(img.affine)
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [3.25, 3.0, 3.6], atol=1e-6)
    # Siemens puts the mosaic's top-left corner in ImagePositionPatient: the first slice's origin is shifted by half
    # the extra mosaic size, (18 - 6) / 2 columns and (15 - 5) / 2 rows; LPS -> RAS flips x and y
    expected_origin = [-(-100.0 + 3.25 * 6), -(-80.0 + 3.0 * 5), 10.0]
    np.testing.assert_allclose(affine[:3, 3], expected_origin, atol=1e-6)

    datalist = build_datalist([tmp_path], progress=False)
    (entry,) = datalist["training"]
    assert entry["dim"] == 3 and entry["size"] == [6, 5, 7] and entry["num_slices"] == 7
    assert entry["spacing"] == [3.25, 3.0, 3.6] and entry["mosaic"] is True


def test_two_mosaic_files_are_two_volumes_not_a_series(tmp_path):
    volume = _mosaic_volume()
    _write_mosaic(tmp_path / "t1.dcm", volume, ipp=(-100.0, -80.0, 10.0))
    _write_mosaic(tmp_path / "t2.dcm", volume + 1, ipp=(-100.0, -80.0, 13.6))
    datalist = build_datalist([tmp_path], progress=False)
    assert [e["dim"] for e in datalist["training"]] == [3, 3]
    assert all(e["size"] == [6, 5, 7] for e in datalist["training"])


def _series_with_empty_slice(folder: Path, missing: int = 3) -> Path:
    vol = np.random.default_rng(2).integers(0, 1000, (12, 10, 8)).astype(np.int16)
    paths = write_dicom_series(folder, vol, modality="MR", spacing=(1.0, 1.0, 6.5))
    Path(paths[missing]).write_bytes(b"")  # a 0-byte slice in the middle
    return folder


def test_dicom_series_with_a_gap_is_refused(tmp_path):
    folder = _series_with_empty_slice(tmp_path / "series")
    with pytest.raises(RejectedFile) as caught:
        LoadMultiModalImage()(folder)
    assert caught.value.category == "bad geometry" and "gap" in str(caught.value) and str(folder) in str(caught.value)

    datalist = build_datalist([tmp_path], progress=False)
    assert datalist["training"] == []
    reasons = {Path(r["path"]).name: r["reason"] for r in datalist["rejected"]}
    assert reasons["0003.dcm"].startswith("empty")
    assert reasons["series"].startswith("bad geometry: a gap") and "13 mm" in reasons["series"]


def test_uneven_dicom_series_is_refused_and_even_one_kept(tmp_path):
    vol = np.random.default_rng(3).integers(0, 1000, (12, 10, 6)).astype(np.int16)
    write_dicom_series(tmp_path / "even", vol, modality="MR", spacing=(1.0, 1.0, 2.0))
    paths = write_dicom_series(tmp_path / "uneven", vol, modality="MR", spacing=(1.0, 1.0, 2.0))
    import pydicom

    ds = pydicom.dcmread(paths[-1])
    ds.ImagePositionPatient = [0.0, 0.0, 10.6]  # 2.6 mm after the previous slice instead of 2.0
    ds.save_as(paths[-1])
    assert tuple(LoadMultiModalImage()(tmp_path / "even").shape) == (1, 12, 10, 6)
    with pytest.raises(RejectedFile, match="non-uniform slice spacing"):
        LoadMultiModalImage()(tmp_path / "uneven")


def test_index_reports_4d_before_modality(tmp_path):
    _nifti(tmp_path / "fmri.nii.gz", np.random.default_rng(1).random((6, 6, 5, 3)).astype(np.float32))
    datalist = build_datalist([tmp_path], progress=False)  # no modality rule matches this folder
    (rejected,) = datalist["rejected"]
    assert rejected["category"] == "unsupported" and "4-D" in rejected["reason"]


def test_shared_rules_match_medmnist_by_pattern(tmp_path):
    rules = ModalityRules.load(REPO / "configs" / "modality_rules_shared_data.yaml")
    for name, modality in (("adrenalmnist3d.npz", "CT"), ("adrenalmnist3d_64.npz", "CT"),
                           ("my_copy/AdrenalMNIST3D.npz", "CT"), ("pneumoniamnist_224.npz", "X-ray"),
                           ("breastmnist.npz", "ultrasound")):
        path = tmp_path / name
        rule = rules.match(str(path), root=str(tmp_path))
        assert rule is not None and rule.modality == modality, name


# ----------------------------------------------------------------------------------------------
# failures set aside, not raised
# ----------------------------------------------------------------------------------------------
def test_failure_tolerant_dataset_and_collate(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((6, 6, 4)).astype(np.float32))
    bad = _nifti(tmp_path / "nan.nii.gz", np.full((6, 6, 4), np.nan, dtype=np.float32))
    data = FailureTolerantDataset([{"image": str(good)}, {"image": str(bad)}], LoadMultiModalImaged("image"))
    batch = collate_skipping_failures([data[0], data[1]])
    assert batch["image"].shape == (1, 1, 6, 6, 4)
    (failure,) = batch[FAILURE_KEY]
    assert failure == {"path": str(bad), "stage": "read", "reason": "non-finite: 144 of 144 values are NaN/Inf"}
    assert collate_skipping_failures([data[1]]) == {FAILURE_KEY: [failure]}


# ----------------------------------------------------------------------------------------------
# datalists and output paths
# ----------------------------------------------------------------------------------------------
def test_outputs_planned_under_output_dir_for_inputs_in_several_folders(tmp_path):
    a = tmp_path / "site_a" / "in" / "case.nii.gz"
    b = tmp_path / "site_b" / "deep" / "in" / "case.png"
    c = tmp_path / "site_b" / "deep" / "in" / "case.dcm"
    series = tmp_path / "site_b" / "deep" / "in" / "case"
    for p in (a, b, c):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    series.mkdir()
    out = tmp_path / "far" / "away" / "out"
    items = plan_outputs([{"image": str(p)} for p in (a, b, c, series)], out, "seg", "auto")
    paths = [Path(i["output_path"]) for i in items]
    assert paths == [
        out / "site_a" / "in" / "case_seg.nii.gz",
        out / "site_b" / "deep" / "in" / "case_seg.png",
        out / "site_b" / "deep" / "in" / "case_dcm_seg.nii.gz",  # case.dcm and the series 'case' share a name
        out / "site_b" / "deep" / "in" / "case_series_seg.nii.gz",
    ]
    assert all(out in p.parents for p in paths)


def test_output_dir_beside_inputs_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "in" / "series").mkdir()
    items = [{"image": str(tmp_path / "in" / "a.nii.gz")}, {"image": str(tmp_path / "in" / "series")}]
    for out in (tmp_path / "in", tmp_path / "in" / "preds", tmp_path / "in" / "series" / "x"):
        with pytest.raises(ValueError, match="input folder"):
            plan_outputs(items, out)
    with pytest.raises(ValueError, match="input folder"):
        check_output_dir(items, tmp_path / "in")
    # around the inputs: the mirrored sub-folders would meet an input folder
    nested = [{"image": str(tmp_path / "x" / "a.png")}, {"image": str(tmp_path / "y" / "x" / "b.png")}]
    with pytest.raises(ValueError, match="a folder holding inputs"):
        plan_outputs(nested, tmp_path / "y")
    with pytest.raises(ValueError, match="must not be empty"):
        plan_outputs(items, tmp_path / "out", output_postfix="")


def test_index_datalist_is_a_bundle_datalist(tmp_path):
    """The JSON the index writes (relative paths, many fields) is read by every bundle's datalist function."""
    folder = tmp_path / "data" / "imagesTr"
    folder.mkdir(parents=True)
    (tmp_path / "data" / "labelsTr").mkdir()
    for i in range(3):
        _nifti(folder / f"c{i}.nii.gz", np.random.default_rng(i).random((6, 6, 4)).astype(np.float32))
        _nifti(tmp_path / "data" / "labelsTr" / f"c{i}.nii.gz", (np.arange(144).reshape(6, 6, 4) % 2).astype(np.uint8))
    datalist = build_datalist([tmp_path / "data"], rules=ModalityRules.from_strings(["*imagesTr*=MR"]), progress=False,
                              relative_to=tmp_path)
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    from dex_monai.data.datalist import segmentation_datalist

    items = segmentation_datalist(datalist=tmp_path / "datalist.json", split="all")
    assert [Path(i["image"]).name for i in items] == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    assert all(Path(i["label"]).is_file() and i["modality"] == "MR" for i in items)
    assert set(items[0]) == {"image", "label", "modality"}
    infer = inference_datalist(datalist=tmp_path / "datalist.json")
    assert [set(i) for i in infer] == [{"image", "modality"}] * 3
    # a class name is not a path
    (tmp_path / "cls.json").write_text(json.dumps({"training": [{"image": "data/imagesTr/c0.nii.gz", "label": "benign"}]}))
    (item,) = load_datalist(tmp_path / "cls.json")
    assert item["label"] == "benign" and item["image"] == str(folder / "c0.nii.gz")


def test_pretraining_dataset_names_the_bad_file(tmp_path):
    from dex_monai.data import SliceDataset

    good = _nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 6)).astype(np.float32) * 100)
    bad = _truncated_nifti(tmp_path / "bad.nii.gz")
    nan = _nifti(tmp_path / "nan.nii.gz", np.full((16, 16, 6), np.nan, dtype=np.float32))
    items = [{"image": str(p), "modality": "MR"} for p in (good, bad, nan)]
    with pytest.raises(RejectedFile, match=r"bad\.nii\.gz: truncated"):
        SliceDataset(items, progress=False)
    data = SliceDataset(items, progress=False, on_error="skip")
    assert [(Path(p).name, r.split(":")[0]) for p, r in data.failed] == [("bad.nii.gz", "truncated"),
                                                                         ("nan.nii.gz", "non-finite")]
    assert len(data) > 0 and {data[i]["filename"] for i in range(len(data))} == {str(good)}
    assert isinstance(data[0]["image"], torch.Tensor)


def test_gzip_text_is_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(RejectedFile, match=r"notes\.nii\.gz: (corrupt|truncated)"):
        LoadMultiModalImage()(path)


def test_pretraining_stop_keeps_the_kind_of_a_non_read_error(tmp_path):
    """on_error='stop' names unreadable files as rejections, but an image of unknown modality is not a corrupt file:
    its own error (UnknownModalityError, naming the file) reaches the user."""
    from dex_monai.data import SliceDataset, UnknownModalityError

    good = _nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).random((16, 16, 6)).astype(np.float32) * 100)
    with pytest.raises(UnknownModalityError, match=r"scan\.nii\.gz"):
        SliceDataset([{"image": str(good)}], progress=False)
