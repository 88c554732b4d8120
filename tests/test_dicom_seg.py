# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
DICOM SEG output (``output_format`` ``dicom_seg``): a label map on a real MR series (PGBM-001 T1post from the shared
data folder) written by :class:`SavePredictiond` as NIfTI and as a DICOM Segmentation; the SEG decoded by highdicom
and brought onto the NIfTI's grid by nibabel equals it voxel by voxel and references the source series and every
source instance; non-DICOM inputs are refused before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def t1post(shared_data) -> Path:
    folder = shared_data / "mr" / "pgbm001_dicom" / "T1post"
    if not folder.is_dir():
        pytest.fail(f"the shared data folder exists but {folder} does not")
    return folder


def seg_on_nifti_grid(seg_path: Path, nifti_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SEG's combined label volume (highdicom) reoriented by nibabel onto the axes of ``nifti_affine`` (RAS),
    with its RAS affine."""
    import highdicom as hd
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    volume = hd.seg.segread(str(seg_path)).get_volume(combine_segments=True)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine  # highdicom volumes are in LPS
    transform = ornt_transform(io_orientation(ras), io_orientation(nifti_affine))
    array = apply_orientation(volume.array, transform)
    return array, ras @ inv_ornt_aff(transform, volume.array.shape)


def test_dicom_seg_equals_nifti_output_on_a_real_series(t1post, tmp_path):
    import nibabel as nib
    import pydicom

    from dex_monai.data.loader import LoadMultiModalImage
    from dex_monai.transforms import SavePredictiond

    image = LoadMultiModalImage()(str(t1post))
    values = image[0].numpy()
    label = np.zeros(values.shape, np.uint8)
    label[values > np.percentile(values, 80)] = 1
    label[values > np.percentile(values, 97)] = 2
    pred = image.clone()
    pred[0] = torch.as_tensor(label.astype(np.float32))
    names = {"0": "background", "1": "anterior", "2": "posterior"}
    save = SavePredictiond("pred", output_dir=tmp_path, label_names=names, algorithm_name="test bundle")
    for ext in (".nii.gz", ".dcm"):
        save({"pred": pred, "image": image, "output_path": str(tmp_path / f"t1post_seg{ext}")})

    nifti = nib.load(str(tmp_path / "t1post_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), label)
    array, affine = seg_on_nifti_grid(tmp_path / "t1post_seg.dcm", nifti.affine)
    assert array.shape == nifti.shape
    np.testing.assert_allclose(affine, nifti.affine, atol=1e-3)
    np.testing.assert_array_equal(array, np.asarray(nifti.dataobj))

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(t1post.glob("*.dcm"))]
    seg = pydicom.dcmread(str(tmp_path / "t1post_seg.dcm"))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "anterior"), (2, "posterior")]


def test_dicom_seg_refuses_inputs_that_are_not_dicom(t1post, tmp_path):
    from dex_monai.data.outputs import plan_outputs

    nifti = tmp_path / "inputs" / "volume.nii.gz"
    nifti.parent.mkdir()
    nifti.write_bytes(b"")
    items = [{"image": str(t1post)}, {"image": str(nifti)}]
    with pytest.raises(ValueError, match=r"needs DICOM inputs.*1 of 2 inputs are not DICOM: .*volume\.nii\.gz \(nifti\)"):
        plan_outputs(items, tmp_path / "out", output_format="dicom_seg")
    planned = plan_outputs(items[:1], tmp_path / "out", output_format="dicom_seg")
    assert planned[0]["output_path"] == str(tmp_path / "out" / "T1post_seg.dcm")
    with pytest.raises(ValueError, match="output_format 'seg' is not one of"):
        plan_outputs(items[:1], tmp_path / "out", output_format="seg")
