"""
End-to-end tests of the MONAI Label app (label_app/) serving the DEX segmentation bundles.

The real server is started as a subprocess with the documented command (``scripts/label_server.sh``) in the
label environment (``.venv-label``, made by ``scripts/setup_label_env.sh``), on a free port of 127.0.0.1, over
a studies folder written here; the endpoints are called over HTTP with ``requests``; the server is stopped at
the end.  Tiny network sizes (bundle-key overrides) keep inference and training to seconds on two CPU cores.

Without the label environment these tests are skipped (with the command that creates it), unless
``DEX_REQUIRE_LABEL_ENV=1`` (CI), which turns its absence into a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("DEX_LABEL_VENV", REPO / ".venv-label"))
LABEL_PY = LABEL_VENV / "bin" / "python"
SERVER_SCRIPT = REPO / "scripts" / "label_server.sh"
SEG3D = REPO / "bundles" / "dex_seg3d"
SEG2D = REPO / "bundles" / "dex_seg2d"
START_TIMEOUT = 240
TRAIN_TIMEOUT = 480

pytestmark = pytest.mark.slow


def _label_env_problem() -> str | None:
    # cheap (no import of torch in the label environment at collection time); a broken environment shows up
    # as a server that does not start, with its log in the failure
    if not LABEL_PY.is_file():
        return f"no MONAI Label environment at {LABEL_VENV}"
    if not list(LABEL_VENV.glob("lib/python3*/site-packages/monailabel/__init__.py")):
        return f"MONAI Label is not installed in {LABEL_VENV}"
    return None


_problem = _label_env_problem()
if _problem:
    _msg = f"{_problem}; create it with: bash scripts/setup_label_env.sh"
    if os.environ.get("DEX_REQUIRE_LABEL_ENV") == "1":
        raise RuntimeError(f"DEX_REQUIRE_LABEL_ENV=1 but {_msg}")
    pytest.skip(f"MONAI Label app tests skipped: {_msg}", allow_module_level=True)

import requests  # noqa: E402  (after the skip: only needed with the label environment)

requests_session = requests.Session()


def _has_bundle(path: Path) -> bool:
    return all((path / "configs" / f).is_file() for f in ("metadata.json", "inference.json", "train.json"))


HAS_2D = _has_bundle(SEG2D)

TINY = {
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_layers": 2,
    "num_heads": 2,
    "num_experts": 2,
    "top_k": 2,
    "feature_size": 8,
    "sw_batch_size": 4,
    "num_workers": 0,
    "cache_rate": 0.0,
    "batch_size": 1,
    "num_samples": 1,
    "mlflow_tracking": False,
    "overlay_images": 0,
}
OVERRIDES = {
    "dex_seg3d": {**TINY, "roi_size": [32, 32, 32]},
    "dex_seg2d": {**TINY, "roi_size": [32, 32]},
}


# ----------------------------------------------------------------------------------------------
# studies written by the tests
# ----------------------------------------------------------------------------------------------
def _affine(spacing, origin, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _write_studies(studies: Path) -> dict:
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    (studies / "labels" / "final").mkdir(parents=True)
    info = {}
    # 3D: two small volumes with two blobs (anterior / posterior); one has a final label
    volumes = [((40, 44, 36), (1.2, 0.9, 1.5), 0.0), ((38, 42, 30), (1.0, 1.1, 1.3), 0.3)]
    for i, (shape, spacing, angle) in enumerate(volumes):
        lab = np.zeros(shape, np.uint8)
        lab[8:18, 10:26, 8:20] = 1
        lab[18:30, 10:26, 8:20] = 2
        img = rng.normal(100, 10, shape).astype(np.float32) + 80.0 * lab
        aff = _affine(spacing, (-10.0 + i, 5.0, 20.0), angle)
        nib.save(nib.Nifti1Image(img, aff), str(studies / f"vol{i}.nii.gz"))
        if i == 0:
            nib.save(nib.Nifti1Image(lab, aff), str(studies / "labels" / "final" / f"vol{i}.nii.gz"))
        info[f"vol{i}"] = {"shape": shape, "affine": aff}
    # 2D: a grey and an RGB picture (non-square, to catch transposed outputs), and a slice stored as NIfTI [H, W, 1]
    pic = (rng.random((40, 56)) * 60).astype(np.uint8)
    pic[10:25, 8:30] += 150
    Image.fromarray(pic).save(studies / "pic0.png")
    Image.fromarray((pic > 100).astype(np.uint8)).save(studies / "labels" / "final" / "pic0.png")
    Image.fromarray(np.stack([pic, pic, pic], -1)).save(studies / "pic1.png")
    slice_aff = _affine((0.7, 0.8, 2.0), (5.0, -3.0, 12.0))
    nib.save(nib.Nifti1Image(pic[..., None].astype(np.float32), slice_aff), str(studies / "slice0.nii.gz"))
    info["pic0"] = {"shape": pic.shape}
    info["pic1"] = {"shape": pic.shape}
    info["slice0"] = {"shape": (40, 56, 1), "affine": slice_aff}
    # not an image: garbage bytes named like one
    (studies / "corrupt.nii.gz").write_bytes(os.urandom(300))
    return info


def _digests(studies: Path) -> dict:
    """Checksums of the user's images (the studies folder minus what MONAI Label writes)."""
    out = {}
    for p in studies.rglob("*"):
        rel = p.relative_to(studies)
        if p.is_file() and rel.parts[0] != "labels" and p.name not in ("datastore_v2.json", ".lock"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.studies = root / "studies"
        self.work = root / "work"
        self.log = root / "server.log"
        self.tmp_parent = root / "tmp"  # the server makes its private temporary folder in here
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.studies_arg: str | None = None  # a DICOMweb URL instead of the studies folder
        self.env: dict = {}  # extra environment of the server (MONAI Label settings)

    def start(self, models: list[str], overrides_by_model: dict | None = None):
        overrides = self.root / "overrides.json"
        overrides.write_text(json.dumps(overrides_by_model or {m: OVERRIDES[m] for m in models}))
        cmd = [
            "bash", str(SERVER_SCRIPT), "--studies", self.studies_arg or str(self.studies), "--port", str(self.port),
            "--conf", "models", ",".join(models),
            "--conf", "overrides", str(overrides),
            "--conf", "work_dir", str(self.work),
        ]  # fmt: skip
        self.tmp_parent.mkdir(exist_ok=True)
        env = {**os.environ, "DEX_LABEL_VENV": str(LABEL_VENV), "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.tmp_parent),
               **self.env}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests_session.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT} s:\n{self.tail()}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)  # the server and its training subprocesses (own session)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.is_file() else ""

    def get(self, path, **kw):
        return requests_session.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path, **kw):
        return requests_session.post(self.url + path, timeout=kw.pop("timeout", 600), **kw)

    def infer(self, model: str, image: str, out: Path) -> requests.Response:
        r = self.post(f"/infer/{model}", params={"image": image, "output": "image"})
        if r.status_code == 200:
            out.write_bytes(r.content)
        return r

    def image_ids(self) -> list[str]:
        return list(self.get("/datastore/", params={"output": "all"}).json()["objects"])

    def wait_for_image(self, image_id: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if image_id in self.image_ids():
                return
            time.sleep(1)
        raise AssertionError(f"{image_id} did not appear in the datastore: {self.image_ids()}")

    def train(self, model: str, params: dict) -> dict:
        r = self.post(f"/train/{model}", json=params)
        assert r.status_code == 200, r.text
        deadline = time.time() + TRAIN_TIMEOUT
        while time.time() < deadline:
            status = self.get("/train/").json()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(3)
        raise AssertionError(f"training of {model} did not finish in {TRAIN_TIMEOUT} s:\n{self.tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert _has_bundle(SEG3D), f"the dex_seg3d bundle is incomplete in {SEG3D}"
    root = tmp_path_factory.mktemp("label_app")
    srv = Server(root)
    srv.studies.mkdir()
    srv.info = _write_studies(srv.studies)
    srv.digests = _digests(srv.studies)
    srv.models = ["dex_seg3d"] + (["dex_seg2d"] if HAS_2D else [])
    try:
        srv.start(srv.models)
        yield srv
    finally:
        srv.stop()


def _load_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _nifti_out(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.nii.gz"


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_info_lists_the_dex_models_with_their_labels(server):
    info = server.get("/info/").json()
    assert set(server.models) <= set(info["models"]), info["models"].keys()
    for name in server.models:
        meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        want = {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
        model = info["models"][name]
        assert model["labels"] == want
        assert model["type"] == "segmentation"
        assert model["dimension"] == len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
        assert model["untrained"] is True  # a fresh working copy starts from initial weights and says so
        assert name in info["trainers"]
    assert info["datastore"]["total"] >= 6 and info["datastore"]["completed"] == 2


def test_infer_3d_returns_a_label_map_in_the_study_geometry(server, tmp_path):
    for image in ("vol0", "vol1"):
        out = _nifti_out(tmp_path, image)
        r = server.infer("dex_seg3d", image, out)
        assert r.status_code == 200, r.text
        data, affine = _load_nifti(out)
        want = server.info[image]
        assert data.shape == tuple(want["shape"])
        np.testing.assert_allclose(affine, want["affine"], atol=1e-4)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}


@pytest.mark.skipif(not HAS_2D, reason="bundles/dex_seg2d is not (yet) complete")
def test_infer_2d_png_and_nifti_slice(server, tmp_path):
    from PIL import Image

    for image in ("pic0", "pic1"):  # grey and RGB pictures -> a PNG label of the same size
        out = tmp_path / f"{image}.png"
        r = server.infer("dex_seg2d", image, out)
        assert r.status_code == 200, r.text
        label = np.asarray(Image.open(out))
        assert label.shape == tuple(server.info[image]["shape"])
        assert set(np.unique(label)) <= {0, 1}
    out = _nifti_out(tmp_path, "slice0")  # a slice stored as NIfTI [H, W, 1] keeps its shape and affine
    r = server.infer("dex_seg2d", "slice0", out)
    assert r.status_code == 200, r.text
    data, affine = _load_nifti(out)
    assert data.shape == server.info["slice0"]["shape"]
    np.testing.assert_allclose(affine, server.info["slice0"]["affine"], atol=1e-4)


def test_real_hippocampus_volume(server, shared_data, tmp_path):
    """A real MR volume (and its label, which then takes part in training), copied into the studies folder."""
    src = shared_data / "mr" / "hippocampus"
    image = sorted((src / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(image, server.studies / "hippo.nii.gz")
    shutil.copy(src / "labelsTr" / image.name, server.studies / "labels" / "final" / "hippo.nii.gz")
    server.digests["hippo.nii.gz"] = hashlib.sha256(image.read_bytes()).hexdigest()
    server.wait_for_image("hippo")  # the datastore notices new files by itself
    out = _nifti_out(tmp_path, "hippo")
    r = server.infer("dex_seg3d", "hippo", out)
    assert r.status_code == 200, r.text
    data, affine = _load_nifti(out)
    ref, ref_affine = _load_nifti(image)
    assert data.shape == ref.shape
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)


def test_dicom_series_study(server, shared_data, tmp_path):
    """A DICOM series folder is one study; viewers get it as NIfTI with the series' geometry."""
    from monai.transforms import LoadImage

    series = shared_data / "mr" / "pgbm001_dicom" / "T1post"
    shutil.copytree(series, server.studies / "T1post")
    for p in (server.studies / "T1post").iterdir():
        server.digests[f"T1post/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    server.wait_for_image("T1post")
    r = server.get("/datastore/image", params={"image": "T1post"})
    assert r.status_code == 200, r.text
    out = _nifti_out(tmp_path, "T1post")
    out.write_bytes(r.content)
    data, affine = _load_nifti(out)
    ref = LoadImage(reader="ITKReader", image_only=True)(str(series))
    assert data.shape == tuple(ref.shape)
    np.testing.assert_allclose(affine, ref.affine.numpy(), atol=1e-3)


@pytest.mark.skipif(not HAS_2D, reason="bundles/dex_seg2d is not (yet) complete")
def test_single_dicom_file_study(server, shared_data, tmp_path):
    """A single-frame DICOM file is a 2D study; its label comes back as NIfTI with the file's shape and affine."""
    from monai.transforms import LoadImage

    src = shared_data / "dicom_single" / "US1_UNCR.dcm"  # RGB ultrasound, 640 x 480
    shutil.copy(src, server.studies / "us1.dcm")
    server.digests["us1.dcm"] = hashlib.sha256(src.read_bytes()).hexdigest()
    server.wait_for_image("us1")
    out = _nifti_out(tmp_path, "us1")
    r = server.infer("dex_seg2d", "us1", out)
    assert r.status_code == 200, r.text
    data, affine = _load_nifti(out)
    ref = LoadImage(image_only=True)(str(src))
    assert data.shape == tuple(int(s) for s in ref.meta["spatial_shape"])
    np.testing.assert_allclose(affine, ref.affine.numpy(), atol=1e-4)


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, tmp_path):
    r = server.post("/infer/dex_seg3d", params={"image": "no_such_study", "output": "image"})
    assert r.status_code == 404, r.text
    assert "no_such_study" in r.json()["detail"] and "not in the datastore" in r.json()["detail"]

    r = server.post("/infer/dex_seg3d", params={"image": "corrupt", "output": "image"})
    assert r.status_code == 422, r.text
    assert "cannot read image 'corrupt'" in r.json()["detail"]

    r = server.post("/infer/dex_seg3d", params={"image": str(REPO / "setup.cfg")})  # only datastore ids / uploads
    assert r.status_code == 403, r.text

    r = server.post("/infer/no_such_model", params={"image": "vol0"})
    assert r.status_code == 404 and "no_such_model" in r.json()["detail"]
    r = server.post("/train/no_such_model", json={"max_epochs": 1})
    assert r.status_code == 404 and "no_such_model" in r.json()["detail"]

    # the studies folder's images are never deleted or replaced through the API
    r = requests_session.delete(f"{server.url}/datastore/", params={"id": "vol1"}, timeout=60)
    assert r.status_code == 403 and (server.studies / "vol1.nii.gz").is_file()
    with open(server.studies / "vol1.nii.gz", "rb") as f:
        r = requests_session.put(f"{server.url}/datastore/", params={"image": "vol0"},
                                 files={"file": ("vol0.nii.gz", f)}, timeout=60)  # fmt: skip
    assert r.status_code == 409, r.text

    # ... and a good request still works
    out = _nifti_out(tmp_path, "after_errors")
    r = server.infer("dex_seg3d", "vol1", out)
    assert r.status_code == 200, r.text
    assert _load_nifti(out)[0].shape == tuple(server.info["vol1"]["shape"])


def _model_pt(server, name) -> Path:
    return server.work / name / "models" / "model.pt"


@pytest.mark.parametrize("name", ["dex_seg3d", "dex_seg2d"])
def test_train_writes_a_new_model_that_the_next_inference_uses(server, tmp_path, name):
    if name not in server.models:
        pytest.skip(f"bundles/{name} is not (yet) complete")
    image = "vol0" if name == "dex_seg3d" else "pic0"
    out = tmp_path / ("out.nii.gz" if name == "dex_seg3d" else "out.png")
    assert server.infer(name, image, out).status_code == 200  # the served network, before training
    model_pt = _model_pt(server, name)
    before = model_pt.stat().st_mtime_ns
    digest = hashlib.sha256(model_pt.read_bytes()).hexdigest()

    status = server.train(name, {"max_epochs": 1})
    assert status["status"] == "DONE", "\n".join(status.get("details", [])) + "\n" + server.tail()
    assert model_pt.stat().st_mtime_ns != before
    assert hashlib.sha256(model_pt.read_bytes()).hexdigest() != digest
    assert server.get("/info/").json()["models"][name]["untrained"] is False

    r = server.infer(name, image, out)
    assert r.status_code == 200, r.text
    # MONAI Label reloads a model whose file changed; its log names the new file time
    new_ts = model_pt.stat().st_mtime
    pattern = r"Reload model from cache\.\s+Prev ts: \S+; Current ts: (\S+)"
    reloads = [float(t) for t in re.findall(pattern, server.tail(400))]
    assert any(abs(t - new_ts) < 1e-3 for t in reloads), server.tail()


def test_the_users_images_are_untouched(server):
    assert _digests(server.studies) == server.digests


def test_stopping_the_server_removes_its_temporary_folder(server):
    # runs last: it stops the module's server
    assert len(list(server.tmp_parent.glob("dex-label-server.*"))) == 1
    server.stop()
    assert server.proc.returncode is not None
    assert list(server.tmp_parent.glob("dex-label-server.*")) == []
