"""The dataset index on made-up folders: entries, rejections with reasons, labels, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from dex_monai.data import ModalityRules, build_datalist, load_datalist, make_synthetic_dataset, write_datalist
from dex_monai.data.index import format_summary, main
from dex_monai.data.synthetic import write_dicom_series
from dex_monai.transforms import LoadMultiModalImaged

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p)] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """A folder of good images of several formats plus every kind of unusable file."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    make_synthetic_dataset(root / "synthetic", n_per_modality=1, size=32, modalities=("CT", "X-ray", "fundus"))
    os.remove(root / "synthetic" / "datalist.json")
    bad = root / "bad"
    bad.mkdir()
    good_png = rng.integers(0, 255, (20, 20), dtype=np.uint8)
    Image.fromarray(good_png).save(bad / "good.png")
    (bad / "empty.png").write_bytes(b"")
    (bad / "garbage.png").write_bytes(rng.integers(0, 255, 300, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(bad / "full.png")
    data = (bad / "full.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    os.remove(bad / "full.png")
    Image.fromarray(np.full((16, 16), 7, dtype=np.uint8)).save(bad / "constant.png")
    arr = rng.random((8, 8)).astype(np.float32)
    arr[2, 3] = np.nan
    np.save(bad / "nan.npy", arr)
    np.save(bad / "inf.npy", np.full((4, 4), np.inf, dtype=np.float32))
    np.save(bad / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (bad / "notes.txt").write_text("not an image")
    vol = rng.integers(-1000, 1000, (16, 16, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), bad / "vol.nii.gz")
    full = (bad / "vol.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), bad / "timeseries.nii.gz")
    np.savez(bad / "mnist.npz", train_images=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), train_labels=np.arange(6))
    zipped = (bad / "mnist.npz").read_bytes()
    (bad / "truncated.npz").write_bytes(zipped[: len(zipped) // 2])
    (bad / "garbage.dcm").write_bytes(b"\x00" * 200)
    # a DICOM folder with two series and a label folder
    write_dicom_series(root / "dicom", rng.integers(-500, 500, (12, 10, 5)).astype(np.int16), "CT", prefix="a_", series_uid="1.2.826.0.1.1")
    write_dicom_series(root / "dicom", rng.integers(0, 900, (12, 10, 4)).astype(np.int16), "MR", prefix="b_", series_uid="1.2.826.0.1.2")
    write_dicom_series(root / "dicom" / "masks", np.ones((12, 10, 2), np.int16), "MR", series_uid="1.2.826.0.1.3")
    # MSD layout: images paired with labels
    (root / "msd" / "imagesTr").mkdir(parents=True)
    (root / "msd" / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.random((8, 8, 6)).astype(np.float32), np.eye(4)), root / "msd" / "imagesTr" / "case_1.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 6), np.uint8), np.eye(4)), root / "msd" / "labelsTr" / "case_1.nii.gz")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"")
    return root


RULES = ModalityRules(
    [("synthetic/ct/*", "CT"), ("synthetic/xray/*", "X-ray"), ("synthetic/fundus/*", "fundus"), ("bad/*", "ultrasound"),
     ("msd/*", "MR")]
)  # fmt: skip

EXPECTED_REJECTIONS = {
    "bad/empty.png": "empty",
    "bad/garbage.png": "corrupt",
    "bad/truncated.png": "truncated",
    "bad/constant.png": "constant",
    "bad/nan.npy": "non-finite",
    "bad/inf.npy": "non-finite",
    "bad/objects.npy": "unsupported",
    "bad/notes.txt": "unsupported",
    "bad/truncated.nii.gz": "truncated",
    "bad/timeseries.nii.gz": "unsupported",
    "bad/truncated.npz": "truncated",
    "bad/garbage.dcm": "corrupt",
}


@pytest.fixture(scope="module")
def datalist(messy) -> dict:
    before = _tree_digest(messy)
    out = build_datalist([messy], rules=RULES, progress=False)
    assert _tree_digest(messy) == before, "the index modified its sources"
    return out


def _rel(root: Path, path: str) -> str:
    return Path(path).relative_to(root).as_posix()


def test_usable_images_are_indexed(messy, datalist):
    images = {(_rel(messy, e["image"]), e.get("npz_key"), e.get("series_uid")): e for e in datalist["training"]}
    assert ("synthetic/ct/ct_000.nii.gz", None, None) in images
    assert ("bad/good.png", None, None) in images
    assert ("bad/vol.nii.gz", None, None) in images
    ct = images[("synthetic/ct/ct_000.nii.gz", None, None)]
    assert ct["modality"] == "CT" and ct["modality_index"] == 0 and ct["modality_source"] == "rule"
    assert ct["dim"] == 3 and ct["size"] == [32, 32, 16] and ct["num_slices"] == 16 and ct["spacing"] == [1.5, 1.5, 3.0]
    assert ct["source"] == str(messy) and ct["format"] == "nifti" and ct["dtype"] == "int16"
    fundus = next(e for k, e in images.items() if k[0].startswith("synthetic/fundus"))
    assert fundus["channels"] == 3 and fundus["dim"] == 2 and fundus["size"] == [32, 32] and fundus["spacing"] is None
    stack = images[("bad/mnist.npz", "train_images", None)]
    assert stack["num_images"] == 6 and stack["label_key"] == "train_labels" and stack["split"] == "train"
    assert datalist["numTraining"] == len(datalist["training"])


def test_dicom_series_grouped_by_uid(messy, datalist):
    series = {e["series_uid"]: e for e in datalist["training"] if e["format"] == "dicom-series"}
    assert set(series) == {"1.2.826.0.1.1", "1.2.826.0.1.2"}
    ct, mr = series["1.2.826.0.1.1"], series["1.2.826.0.1.2"]
    assert ct["image"] == mr["image"] == str(messy / "dicom")
    assert (ct["modality"], ct["modality_source"], ct["size"], ct["num_files"]) == ("CT", "dicom", [12, 10, 5], 5)
    assert (mr["modality"], mr["size"]) == ("MR", [12, 10, 4])
    assert ct["spacing"] == [1.0, 1.0, 2.0]
    load = LoadMultiModalImaged()
    assert load(ct)["image"].shape == (1, 12, 10, 5)
    assert load(mr)["image"].shape == (1, 12, 10, 4)


def test_rejected_with_reasons(messy, datalist):
    rejected = {_rel(messy, r["path"]): r for r in datalist["rejected"]}
    for path, category in EXPECTED_REJECTIONS.items():
        assert path in rejected, f"{path} not rejected"
        assert rejected[path]["category"] == category, rejected[path]
        assert rejected[path]["reason"].startswith(category + ": ")
    assert "allow_pickle" in rejected["bad/objects.npy"]["reason"] or "pickle" in rejected["bad/objects.npy"]["reason"]
    assert not any(".hidden" in r["path"] for r in datalist["rejected"])
    assert datalist["summary"]["rejected"] == len(datalist["rejected"])


def test_labels_listed_and_paired(messy, datalist):
    labels = {_rel(messy, lab["label"]) for lab in datalist["label_files"]}
    assert "msd/labelsTr/case_1.nii.gz" in labels
    assert {"dicom/masks/0000.dcm", "dicom/masks/0001.dcm"} <= labels
    case = next(e for e in datalist["training"] if e["image"].endswith("case_1.nii.gz"))
    assert case["label"] == str(messy / "msd" / "labelsTr" / "case_1.nii.gz")
    assert not any("labelsTr" in e["image"] or "masks" in e["image"] for e in datalist["training"])


def test_unknown_modality_is_reported_not_guessed(messy):
    out = build_datalist([messy / "synthetic"], rules=None, progress=False)
    assert out["numTraining"] == 0
    assert {r["category"] for r in out["rejected"]} == {"unknown modality"}
    assert all("no modality rule matches" in r["reason"] for r in out["rejected"])


def test_header_only_mode(messy, tmp_path):
    vol = np.arange(4 * 4 * 3, dtype=np.int16).reshape(4, 4, 3)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii")
    data = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-20])
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(tmp_path / "flat.png")
    out = build_datalist([tmp_path], rules=ModalityRules([("*", "MR")]), check_pixels=False, progress=False)
    rejected = {Path(r["path"]).name: r["category"] for r in out["rejected"]}
    assert rejected == {"cut.nii": "truncated"}  # found from the header and the file size
    assert {Path(e["image"]).name for e in out["training"]} == {"v.nii", "flat.png"}  # constant needs pixels


def test_deterministic_and_relative(messy, datalist, tmp_path):
    again = build_datalist([messy], rules=RULES, progress=False)
    assert json.dumps(again) == json.dumps(datalist)
    out = tmp_path / "lists" / "dl.json"
    rel = build_datalist([messy], rules=RULES, progress=False, relative_to=out.parent)
    write_datalist(rel, out)
    assert not os.path.isabs(rel["training"][0]["image"])
    items = load_datalist(out)
    assert [i["image"] for i in items] == [e["image"] for e in datalist["training"]]
    assert items[0]["source"] == str(messy)
    assert all(i["modality"] == e["modality"] for i, e in zip(items, datalist["training"]))


def test_summary_table(datalist):
    table = format_summary(datalist)
    assert table.splitlines()[0].split()[:2] == ["modality", "entries"]
    for m in ("CT", "MR", "X-ray", "fundus", "ultrasound"):
        assert any(line.startswith(m) for line in table.splitlines())
    assert "rejected: " in table and "truncated" in table


def test_cli_in_process(messy, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {pattern: 'synthetic/ct/*', modality: CT}\n")
    out = tmp_path / "a.json"
    code = main([str(messy / "synthetic"), "--out", str(out), "--rules", str(rules), "--rule", "*/xray/*=X-ray"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "CT" in printed and "X-ray" in printed and "datalist written to" in printed
    first = out.read_bytes()
    assert main([str(messy / "synthetic"), "--out", str(out), "--rules", str(rules), "--rule", "*/xray/*=X-ray", "--quiet"]) == 0
    assert out.read_bytes() == first  # re-running gives the same JSON
    content = json.loads(first)
    assert {e["modality"] for e in content["training"]} == {"CT", "X-ray"}
    assert {r["category"] for r in content["rejected"]} == {"unknown modality"}  # fundus: no rule
    # nothing usable: non-zero exit status, the JSON (with the rejections) is still written
    inside = messy / "synthetic" / "xray" / "list.json"  # the output inside a scanned folder
    args = [str(messy / "synthetic" / "xray"), "--out", str(inside), "--rule", "*=X-ray", "--quiet"]
    assert main(args) == 0
    first = inside.read_bytes()
    assert main(args) == 0
    assert inside.read_bytes() == first
    os.remove(inside)
    assert main([str(messy / "bad" / "notes.txt"), "--out", str(tmp_path / "none.json"), "--quiet"]) == 1
    assert json.loads((tmp_path / "none.json").read_text())["rejected"][0]["category"] == "unsupported"
    assert main([str(messy), "--out", str(tmp_path / "x.json"), "--rule", "no-equals"]) == 2


def test_cli_as_module(messy, tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dex_monai.data.index", str(messy / "synthetic" / "xray"), "--out", str(out),
         "--rule", "*=X-ray"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "X-ray" in proc.stdout and "indexing" in proc.stderr  # summary table, progress bar
    assert "RuntimeWarning" not in proc.stderr
    assert json.loads(out.read_text())["numTraining"] == 1


def test_dicom_files_without_suffix(tmp_path):
    paths = write_dicom_series(tmp_path / "s", np.zeros((6, 6, 3), np.int16) + np.arange(3, dtype=np.int16), "MR")
    for i, p in enumerate(paths):
        os.rename(p, tmp_path / "s" / f"1.2.840.99.{i}")  # UID-like names, no suffix
    (tmp_path / "s" / "README").write_text("not DICOM")
    out = build_datalist([tmp_path], progress=False)
    assert [(e["format"], e["modality"], e["size"]) for e in out["training"]] == [("dicom-series", "MR", [6, 6, 3])]
    assert [Path(r["path"]).name for r in out["rejected"]] == ["README"]
    assert LoadMultiModalImaged()(out["training"][0])["image"].shape == (1, 6, 6, 3)
