"""Readers for every format, on small files written by the tests (real scans: test_data_real.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dex_monai.data import (
    DicomFileReader,
    DicomSeriesReader,
    ImageDecodeError,
    ITKImageReader,
    NiftiReader,
    NpzStackReader,
    NumpyImageReader,
    PILImageReader,
    image_format,
    reader_for,
)
from dex_monai.data.readers import medmnist_splits, npz_array_info
from dex_monai.data.synthetic import write_dicom_series
from dex_monai.transforms import LoadMultiModalImage, LoadMultiModalImaged


@pytest.fixture(scope="module")
def load():
    return LoadMultiModalImage()


@pytest.mark.parametrize(
    "name, fmt, reader",
    [
        ("a.nii.gz", "nifti", NiftiReader), ("a.nii", "nifti", NiftiReader), ("a.png", "png", PILImageReader),
        ("a.JPG", "jpeg", PILImageReader), ("a.tiff", "tiff", PILImageReader), ("a.nrrd", "nrrd", ITKImageReader),
        ("a.mha", "metaimage", ITKImageReader), ("a.npy", "npy", NumpyImageReader), ("a.npz", "npz", NpzStackReader),
        ("a.dcm", "dicom", DicomFileReader),
    ],
)  # fmt: skip
def test_format_and_reader_choice(tmp_path, name, fmt, reader):
    assert image_format(tmp_path / name) == fmt
    assert isinstance(reader_for(tmp_path / name), reader)


def test_folder_is_a_dicom_series_and_unsupported_is_named(tmp_path):
    assert image_format(tmp_path) == "dicom-series"
    assert isinstance(reader_for(tmp_path), DicomSeriesReader)
    with pytest.raises(ImageDecodeError, match=r"notes\.txt.*unsupported"):
        reader_for(tmp_path / "notes.txt")


def test_png_grey_palette_alpha_and_16_bit(tmp_path, load):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)  # numpy [H, W]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out = load(tmp_path / "grey.png")
    assert out.shape == (1, 12, 10)  # [C, X, Y]: x first, as every MONAI reader
    assert torch.equal(out[0], torch.as_tensor(grey.T, dtype=torch.float32))
    assert out.meta["intensity_range"] == [0.0, 255.0] and out.meta["display_referred"]

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    out = load(tmp_path / "palette.png")
    assert out.shape == (3, 2, 2)  # palette -> RGB
    assert out[:, 0, 0].tolist() == [255.0, 0.0, 0.0] and out[:, 1, 0].tolist() == [0.0, 0.0, 255.0]

    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 17
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = load(tmp_path / "rgba.png")
    assert out.shape == (3, 5, 4) and float(out[1].max()) == 200.0  # alpha dropped, colour kept

    deep = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = load(tmp_path / "deep.png")
    assert out.shape == (1, 5, 4) and float(out.max()) == 57000.0
    assert out.meta["intensity_range"] == [0.0, 65535.0]

    Image.fromarray(deep).save(tmp_path / "deep.tif")
    out = load(tmp_path / "deep.tif")
    assert float(out.max()) == 57000.0 and out.meta["intensity_range"] == [0.0, 65535.0]


def test_nrrd_through_itk_and_npy(tmp_path, load):
    import itk

    vol = np.random.default_rng(0).integers(-100, 100, (6, 5, 4)).astype(np.int16)  # numpy [Z, Y, X]
    itk.imwrite(itk.image_from_array(vol), str(tmp_path / "v.nrrd"))
    out = load(tmp_path / "v.nrrd")
    assert out.shape == (1, 4, 5, 6)
    assert torch.equal(out[0], torch.as_tensor(vol.T, dtype=torch.float32))
    assert out.meta["stored_dtype"] == "int16" and not out.meta["display_referred"]

    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    assert load(tmp_path / "a.npy").shape == (1, 4, 3)  # numpy [H, W] -> [C, X, Y]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageDecodeError, match=r"obj\.npy: unsupported: object \(pickled\) array.*allow_pickle"):
        load(tmp_path / "obj.npy")


def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (5, 8, 6), dtype=np.uint8)
    colour = rng.integers(0, 255, (3, 8, 6, 3), dtype=np.uint8)
    vols = rng.integers(0, 255, (2, 4, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "m.npz", train_images=train, train_labels=np.arange(5), val_images=colour)
    np.savez(tmp_path / "v.npz", test_images=vols, test_labels=np.zeros(2))
    info = npz_array_info(tmp_path / "m.npz")
    assert info["train_images"] == ((5, 8, 6), "uint8")
    assert medmnist_splits(list(info)) == [("train_images", "train_labels"), ("val_images", None)]
    load = LoadMultiModalImaged()
    out = load({"image": str(tmp_path / "m.npz"), "npz_key": "train_images", "npz_index": 2})["image"]
    assert out.shape == (1, 6, 8)  # [C, X, Y]
    assert torch.equal(out[0], torch.as_tensor(train[2].T, dtype=torch.float32))
    assert out.meta["display_referred"] and out.meta["intensity_range"] == [0.0, 255.0]
    out = load({"image": str(tmp_path / "m.npz"), "npz_key": "val_images", "npz_index": 1})["image"]
    assert out.shape == (3, 6, 8)
    out = load({"image": str(tmp_path / "v.npz"), "npz_key": "test_images", "npz_index": 1})["image"]
    assert out.shape == (1, 4, 4, 4)
    with pytest.raises(ImageDecodeError, match="index 9 out of range"):
        load({"image": str(tmp_path / "m.npz"), "npz_key": "train_images", "npz_index": 9})
    with pytest.raises(ImageDecodeError, match="no array 'nope'"):
        load({"image": str(tmp_path / "m.npz"), "npz_key": "nope", "npz_index": 0})
    with pytest.raises(ValueError, match="expand it"):
        load({"image": str(tmp_path / "m.npz"), "npz_key": "train_images", "num_images": 5})


def test_dicom_series_in_hu_and_series_choice(tmp_path, load):
    hu = np.random.default_rng(1).integers(-1000, 1500, (6, 5, 4)).astype(np.int16)
    mr = np.random.default_rng(2).integers(0, 900, (6, 5, 3)).astype(np.int16)
    write_dicom_series(tmp_path / "s", hu, modality="CT", prefix="ct_", series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "s", mr, modality="MR", prefix="mr_", series_uid="1.2.3.2")
    out = load(tmp_path / "s", series_uid="1.2.3.1")
    assert out.shape == (1, 6, 5, 4)
    assert torch.equal(out[0], torch.as_tensor(hu, dtype=torch.float32))  # rescale applied: HU
    assert out.meta["dicom_modality"] == "CT" and out.meta["num_files"] == 4
    assert load(tmp_path / "s", series_uid="1.2.3.2").shape == (1, 6, 5, 3)
    with pytest.raises(ImageDecodeError, match="holds 2 DICOM series"):
        load(tmp_path / "s")
    with pytest.raises(ImageDecodeError, match="no DICOM series with SeriesInstanceUID '9.9'"):
        load(tmp_path / "s", series_uid="9.9")
    # one file of the series through pydicom: same HU values
    single = load(tmp_path / "s" / "ct_0002.dcm")
    assert single.shape == (1, 6, 5)
    assert torch.equal(single[0], torch.as_tensor(hu[:, :, 2], dtype=torch.float32))
    assert single.meta["transfer_syntax"] == "1.2.840.10008.1.2.1"


def test_dicom_monochrome1_multiframe_rgb(tmp_path, load):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path, arr, photometric, modality="CR", bits=12, frames=None):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, modality
        ds.SeriesInstanceUID = generate_uid()
        shape = arr.shape[1:] if frames else arr.shape
        ds.Rows, ds.Columns = shape[0], shape[1]
        ds.PhotometricInterpretation = photometric
        ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
        if photometric == "RGB":
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        ds.PixelData = arr.tobytes()
        ds.save_as(path, enforce_file_format=True)
        return pydicom.dcmread(path)

    raw = np.array([[0, 100], [4000, 4095]], dtype=np.uint16)
    write(tmp_path / "m1.dcm", raw, "MONOCHROME1")
    out = load(tmp_path / "m1.dcm")
    assert out.shape == (1, 2, 2) and out.meta["intensity_range"] == [0.0, 4095.0]
    assert torch.equal(out[0], torch.as_tensor(4095 - raw.T, dtype=torch.float32))  # inverted

    frames = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)  # [F, rows, cols]
    write(tmp_path / "mf.dcm", frames, "MONOCHROME2", modality="MR", frames=3)
    out = load(tmp_path / "mf.dcm")
    assert out.shape == (1, 5, 4, 3)  # [C, X (cols), Y (rows), F]
    assert torch.equal(out[0, :, :, 1], torch.as_tensor(frames[1].T, dtype=torch.float32))

    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    write(tmp_path / "rgb.dcm", rgb, "RGB", modality="XC", bits=8)
    out = load(tmp_path / "rgb.dcm")
    assert out.shape == (3, 5, 4) and out.meta["display_referred"]
    assert torch.equal(out[1], torch.as_tensor(rgb[..., 1].T, dtype=torch.float32))

    (tmp_path / "bad.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(ImageDecodeError, match=r"bad\.dcm.*not a valid DICOM"):
        load(tmp_path / "bad.dcm")
