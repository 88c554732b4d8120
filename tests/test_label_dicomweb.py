"""
End to end: the MONAI Label app (label_app/) on a real DICOMweb server, Orthanc with its DICOMweb plugin.

A real MR series of the shared data (``mr/pgbm001_dicom/T1post``, 24 slices) is stored in a fresh Orthanc
(``tests/orthanc_helpers.py``: own configuration, free port, storage in a temporary folder, stopped at the end); the
label server is started with the documented command ``scripts/label_server.sh --studies <Orthanc>/dicom-web`` and
called over HTTP: it lists the series, ``/infer`` returns a label map with the series' geometry (computed here from
the DICOM headers with pydicom), a saved final label ends up in Orthanc as a DICOM SEG of the same study (read back
with highdicom and compared voxel by voxel), and unknown series ids get HTTP 404 while the server keeps serving.

Without Orthanc (Debian packages orthanc, orthanc-dicomweb: ``bash scripts/setup_orthanc.sh``) or without the label
environment these tests are skipped, unless ``DEX_REQUIRE_LABEL_ENV=1`` (CI), which makes that a failure.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from orthanc_helpers import Orthanc, orthanc_problem
from test_label_app import TINY, Server, requests_session

pytestmark = pytest.mark.slow

SERIES = Path("mr") / "pgbm001_dicom" / "T1post"
#: a coarse grid keeps the sliding window to a few patches of the tiny network
OVERRIDES = {"dex_seg3d": {**TINY, "roi_size": [32, 32, 32], "pixdim": [4.0, 4.0, 6.0]}}
LABEL_NAMES = ("anterior", "posterior")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, shared_data):
    problem = orthanc_problem()
    if problem:
        msg = f"{problem}; install it with: bash scripts/setup_orthanc.sh (as root)"
        if os.environ.get("DEX_REQUIRE_LABEL_ENV") == "1":
            pytest.fail(f"DEX_REQUIRE_LABEL_ENV=1 but {msg}")
        pytest.skip(f"MONAI Label DICOMweb tests skipped: {msg}")
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    try:
        pacs.files = sorted((shared_data / SERIES).glob("*.dcm"))
        answers = pacs.upload(pacs.files)
        assert [a["Status"] for a in answers] == ["Success"] * len(pacs.files)
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def series(orthanc):
    """The uploaded series as pydicom headers sorted along the slice normal, and its geometry (RAS affine)."""
    import pydicom

    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in orthanc.files]
    row_dir, col_dir = (np.array(headers[0].ImageOrientationPatient[i : i + 3], float) for i in (0, 3))
    normal = np.cross(row_dir, col_dir)
    headers.sort(key=lambda h: float(np.dot(normal, np.array(h.ImagePositionPatient, float))))
    first, last = (np.array(h.ImagePositionPatient, float) for h in (headers[0], headers[-1]))
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)  # voxel (column i, row j, slice k) -> patient LPS (mm)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = (last - first) / (len(headers) - 1)
    lps[:3, 3] = first
    return {
        "study": str(headers[0].StudyInstanceUID),
        "uid": str(headers[0].SeriesInstanceUID),
        "positions": np.array([h.ImagePositionPatient for h in headers], float),
        "shape": (int(headers[0].Columns), int(headers[0].Rows), len(headers)),
        "affine": np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps,  # NIfTI's RAS
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, orthanc):
    srv = Server(tmp_path_factory.mktemp("label_dicomweb"))
    srv.studies_arg = orthanc.dicomweb_url
    # MONAI Label lists the series of this modality (its default is CT)
    srv.env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"})}
    try:
        srv.start(["dex_seg3d"], OVERRIDES)
        yield srv
    finally:
        srv.stop()


def _put(server: Server, path: str, **kw):
    return requests_session.put(server.url + path, timeout=kw.pop("timeout", 300), **kw)


def _load_nifti(content: bytes):
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content)
    return np.asarray(img.dataobj), img.affine


def test_the_label_server_lists_the_orthanc_series(server, series):
    status = server.get("/datastore/").json()
    assert status["total"] == 1, status
    r = server.post("/activelearning/first", json={})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == series["uid"]
    # OHIF, as MONAI Label serves it (/ohif/), reads the studies through the server's DICOMweb proxy
    r = server.get("/proxy/dicom/qido/studies")
    assert r.status_code == 200, r.text
    assert [s["0020000D"]["Value"] for s in r.json()] == [[series["study"]]]
    r = server.get("/ohif/")
    assert r.status_code == 200 and "<html" in r.text.lower()


def test_unknown_series_get_404_and_the_server_keeps_serving(server, series):
    for bad in ("1.2.3.4.5", "not-a-uid"):
        r = server.post("/infer/dex_seg3d", params={"image": bad, "output": "image"}, timeout=60)
        assert r.status_code == 404, r.text
        assert "not on the DICOMweb server" in r.json()["detail"]
        r = server.get("/datastore/image", params={"image": bad}, timeout=60)
        assert r.status_code == 404, r.text
        r = _put(server, "/datastore/label", params={"image": bad}, files={"label": ("x.nii.gz", b"x")}, timeout=60)
        assert r.status_code == 404, r.text
    # the next good request works: the series, downloaded from Orthanc and converted, in its own geometry
    r = server.get("/datastore/image", params={"image": series["uid"]}, timeout=120)
    assert r.status_code == 200, r.text
    data, affine = _load_nifti(r.content)
    assert data.shape == series["shape"]
    np.testing.assert_allclose(affine, series["affine"], atol=1e-3)


def test_infer_returns_a_label_map_in_the_series_geometry(server, series):
    r = server.post("/infer/dex_seg3d", params={"image": series["uid"], "output": "image"})
    assert r.status_code == 200, r.text
    data, affine = _load_nifti(r.content)
    assert data.shape == series["shape"]
    np.testing.assert_allclose(affine, series["affine"], atol=1e-3)
    assert set(np.unique(data)) <= {0, 1, 2}


def test_saved_label_is_stored_in_orthanc_as_dicom_seg(server, orthanc, series, tmp_path):
    import highdicom as hd
    import nibabel as nib
    import requests

    label = np.zeros(series["shape"], np.uint8)  # (column, row, slice), like the NIfTI of the series
    label[90:140, 120:170, 8:12] = 1
    label[100:130, 150:200, 12:15] = 2
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, series["affine"]), str(path))
    params = {"label_info": [{"name": n, "idx": i + 1} for i, n in enumerate(LABEL_NAMES)]}
    with open(path, "rb") as f:
        r = _put(server, "/datastore/label", params={"image": series["uid"], "tag": "final"},
                 data={"params": json.dumps(params)}, files={"label": ("label.nii.gz", f)})  # fmt: skip
    assert r.status_code == 200, r.text

    segs = orthanc.qido_series(Modality="SEG")  # QIDO-RS on Orthanc itself
    assert len(segs) == 1, segs
    assert segs[0]["0020000D"]["Value"] == [series["study"]]
    found = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Instance", "Query": {"Modality": "SEG"}},
                          timeout=30).json()  # fmt: skip
    assert len(found) == 1
    content = requests.get(f"{orthanc.url}/instances/{found[0]}/file", timeout=30).content
    seg = hd.seg.segread(io.BytesIO(content))
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series["uid"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(LABEL_NAMES)
    # each frame: one segment on one plane; the plane's position (LPS, mm) tells the slice of the series
    frames = seg.pixel_array.reshape(-1, *label.shape[1::-1])  # (frame, row, column)
    decoded = np.zeros(label.shape[::-1], np.uint8)  # (slice, row, column)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.array(groups.PlanePositionSequence[0].ImagePositionPatient, float)
        distances = np.linalg.norm(series["positions"] - position, axis=1)
        assert distances.min() < 1e-3, f"a SEG frame at {position} lies on no slice of the series"
        segment = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        decoded[int(distances.argmin())][frame > 0] = segment
    np.testing.assert_array_equal(decoded, label.transpose(2, 1, 0))
