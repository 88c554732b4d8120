# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
End-to-end tests of ``bundles/dex_seg3d`` on real MR volumes (MSD hippocampus from the shared data folder) at a tiny
size: one training epoch initialised from a DEX pre-training checkpoint through ``python -m monai.bundle run``, an
evaluation run, inference on NIfTI volumes and a DICOM series, MLflow records, ``verify_metadata``,
``verify_net_in_out`` and ONNX and torch.export exports that give the checkpoint's output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dex_seg3d"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "bundles" / "schemas" / "meta_schema_20240725.json"

ENCODER = {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}
NETWORK = {"roi_size": [32, 32, 32], "patch_size": 16, "feature_size": 8, **ENCODER}
TINY = {
    **NETWORK,
    "epochs": 1,
    "batch_size": 2,
    "num_samples": 1,
    "num_workers": 0,
    "sw_batch_size": 4,
    "max_train_items": 4,
    "max_val_items": 1,
    "log_interval": 1,
    "overlay_images": 1,
}
INPUT_SHAPE = [1, 1, 32, 32, 32]

pytestmark = pytest.mark.slow


from bundle_helpers import export_and_compare  # noqa: E402
from bundle_helpers import folder_digest as _digest  # noqa: E402
from bundle_helpers import list_artifacts as _artifacts  # noqa: E402
from bundle_helpers import mlflow_runs as _mlflow_runs  # noqa: E402
from bundle_helpers import run_bundle  # noqa: E402


from bundle_helpers import files_under, read_failures  # noqa: E402


def _run_bundle(configs: list[str], overrides: dict, timeout: int = 600, expect_exit: int = 0) -> subprocess.CompletedProcess:
    return run_bundle(configs, overrides, CONFIGS, timeout, expect_exit)


def _write_dicom_series(volume: np.ndarray, folder: Path, spacing=(1.0, 1.0, 1.5)) -> None:
    """A small MR DICOM series from ``volume[x, y, z]`` (one file per z, identity orientation)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    data = np.clip(volume, 0, 4000).astype(np.uint16)
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID, ds.Modality = study, series, "TEST", "MR"
        ds.InstanceNumber = k + 1
        plane = np.ascontiguousarray(data[:, :, k].T)  # rows are y, columns are x
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
        ds.PixelData = plane.tobytes()
        ds.save_as(str(folder / f"slice_{k:03d}.dcm"), enforce_file_format=True)


@pytest.fixture(scope="module")
def hippocampus(shared_data) -> Path:
    root = shared_data / "mr" / "hippocampus"
    if not (root / "imagesTr").is_dir():
        pytest.fail(f"the shared data folder exists but {root}/imagesTr does not")
    return root


@pytest.fixture(scope="module")
def pretrain_models(tmp_path_factory) -> Path:
    """A DEX pre-training checkpoint as the pre-training bundle writes it: 2D, 3 channels, patch 8, ``{"model": ...}``."""
    from dex_monai.networks import DEXMaskedAutoEncoder

    torch.manual_seed(1)
    mae = DEXMaskedAutoEncoder(3, 64, 8, spatial_dims=2, decoder_hidden_size=32, decoder_mlp_dim=64,
                               decoder_num_layers=1, decoder_num_heads=2, **ENCODER)
    folder = tmp_path_factory.mktemp("dex_pretrain") / "models"
    folder.mkdir()
    torch.save({"model": mae.state_dict()}, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hippocampus, pretrain_models) -> dict:
    root = tmp_path_factory.mktemp("seg3d")
    overrides = {**TINY, "bundle_root": str(root), "dataset_dir": str(hippocampus), "init": "dex",
                 "pretrained_checkpoint": str(pretrain_models)}
    proc = _run_bundle([str(CONFIGS / "train.json")], overrides)
    return {"root": root, "log": proc.stdout + proc.stderr, "overrides": overrides}


def test_train_one_epoch_from_dex_checkpoint(trained):
    root = trained["root"]
    assert "initialised DEXUNETR from dex checkpoint" in trained["log"]
    assert "2D kernel inflated to 3D" in trained["log"]  # the 2D RGB pre-training stem adapted to 3D MR
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("vit.blocks.0.dex.") for k in state)

    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_seg3d")
    (name, run), = runs.items()
    assert name.startswith("seg3d_train_") and run.info.status == "FINISHED"
    for metric in ("val_mean_dice", "val_hd95", "train_loss"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1], metric
    assert 0.0 <= run.data.metrics["val_mean_dice"] <= 1.0
    assert run.data.tags["init"] == "dex" and run.data.tags["finetune_mode"] == "experts"
    assert run.data.params["hidden_size"] == "48"
    artifacts = _artifacts(client, run.info.run_id)
    assert "overlays/val_epoch_1.png" in artifacts and "config/config.json" in artifacts
    assert (root / "eval" / "overlays" / "val_epoch_1.png").stat().st_size > 0
    from bundle_helpers import assert_training_records

    assert_training_records(client, run, "dex_seg3d")


def test_evaluate(trained):
    root = trained["root"]
    overrides = {**trained["overrides"], "save_predictions": True}
    _run_bundle([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], overrides)
    metrics = (root / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in metrics and "val_hd95" in metrics
    written = sorted((root / "eval" / "evaluate_predictions").glob("*_seg.nii.gz"))
    assert len(written) == 1
    # a label map with the image's grid, not a one-hot 4-D file
    import nibabel as nib

    pred = nib.load(str(written[0]))
    source = nib.load(str(Path(trained["overrides"]["dataset_dir"]) / "imagesTr" / written[0].name.replace("_seg", "")))
    assert pred.shape == source.shape and set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}
    # per-class columns named by label (without background, MONAI's class0 is label 1)
    header = (root / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[0].split(",")
    assert header == ["filename", "anterior (1)", "posterior (2)", "mean"]
    summary = (root / "eval" / "val_hd95_summary.csv").read_text()
    assert "anterior (1)" in summary and "class0" not in summary
    client, runs = _mlflow_runs(root / "eval" / "mlruns.db", "dex_seg3d")
    evaluate = [r for n, r in runs.items() if n.startswith("seg3d_evaluate_")]
    assert len(evaluate) == 1 and evaluate[0].info.status == "FINISHED"
    assert "val_mean_dice" in evaluate[0].data.metrics
    artifacts = _artifacts(client, evaluate[0].info.run_id)
    assert "overlays/evaluate_epoch_1.png" in artifacts and "metrics.csv" in artifacts


def test_inference_restores_geometry(trained, hippocampus, tmp_path):
    import nibabel as nib
    from monai.transforms import LoadImage

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    names = sorted(p.name for p in (hippocampus / "imagesTr").glob("hippocampus_*.nii.gz"))[:2]
    for name in names:
        shutil.copy(hippocampus / "imagesTr" / name, inputs / name)
    source = nib.load(str(inputs / names[0]))
    _write_dicom_series(np.asarray(source.dataobj, dtype=np.float32)[:, :, :12] * 10, inputs / "series")
    before = _digest(inputs)
    output = tmp_path / "predictions"
    overrides = {**NETWORK, "bundle_root": str(trained["root"]), "input_dir": str(inputs),
                 "output_dir": str(output), "num_workers": 0, "overlap": 0.25}
    _run_bundle([str(CONFIGS / "inference.json")], overrides)

    assert _digest(inputs) == before  # inputs untouched, nothing written next to them
    for name in names:
        image = nib.load(str(inputs / name))
        pred = nib.load(str(output / name.replace(".nii.gz", "_seg.nii.gz")))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        values = np.unique(np.asarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1, 2} and pred.get_data_dtype() == np.uint8
    series = LoadImage(image_only=True)(str(inputs / "series"))
    pred = nib.load(str(output / "series_seg.nii.gz"))
    assert pred.shape == tuple(series.shape)
    np.testing.assert_allclose(pred.affine, np.asarray(series.affine), atol=1e-3)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}

    client, runs = _mlflow_runs(trained["root"] / "eval" / "mlruns.db", "dex_seg3d")
    inference = [r for n, r in runs.items() if n.startswith("seg3d_inference_")]
    assert len(inference) == 1 and inference[0].info.status == "FINISHED"


def test_inference_goes_on_past_broken_inputs(trained, hippocampus, tmp_path):
    """Good volumes among a truncated NIfTI, a NaN volume, a text file named .png and a DICOM series with an empty
    slice: the good ones are predicted, each bad one is named with its reason in the log and in failed.csv, the exit
    status is 1, the MLflow run ends FAILED; nothing is written outside output_dir and no input file changes."""
    import nibabel as nib

    inputs = tmp_path / "archive" / "study"
    inputs.mkdir(parents=True)
    names = sorted(p.name for p in (hippocampus / "imagesTr").glob("hippocampus_*.nii.gz"))[2:4]
    for name in names:
        shutil.copy(hippocampus / "imagesTr" / name, inputs / name)
    raw = (inputs / names[0]).read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.full((20, 20, 12), np.nan, dtype=np.float32), np.eye(4)), str(inputs / "nan.nii.gz"))
    (inputs / "notes.png").write_text("not a picture")
    (inputs / "readme.txt").write_text("an archive's own file, not an image")
    source = np.asarray(nib.load(str(inputs / names[0])).dataobj, dtype=np.float32)
    _write_dicom_series(source[:, :, :10] * 10, inputs / "gap_series")
    (inputs / "gap_series" / "slice_004.dcm").write_bytes(b"")
    before = _digest(tmp_path / "archive")
    output = tmp_path / "elsewhere" / "deep" / "out"
    overrides = {**NETWORK, "bundle_root": str(trained["root"]), "input_dir": str(inputs), "output_dir": str(output),
                 "num_workers": 0, "overlap": 0.25, "run_name": "broken_inputs"}
    proc = _run_bundle([str(CONFIGS / "inference.json")], overrides, expect_exit=1)
    log = proc.stdout + proc.stderr

    assert _digest(tmp_path / "archive") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive", "elsewhere"]
    written = files_under(output)
    assert {f"{n.replace('.nii.gz', '')}_seg.nii.gz" for n in names} <= written
    assert written - {f"{n.replace('.nii.gz', '')}_seg.nii.gz" for n in names} == {"failed.csv",
                                                                                  "overlays/inference_epoch_1.png"}
    for name in names:
        image = nib.load(str(inputs / name))
        pred = nib.load(str(output / name.replace(".nii.gz", "_seg.nii.gz")))
        assert pred.shape == image.shape
    failures = read_failures(output)
    assert set(failures) == {"truncated.nii.gz", "nan.nii.gz", "notes.png", "gap_series"}
    assert failures["truncated.nii.gz"][0] == "read" and failures["truncated.nii.gz"][1].startswith("truncated")
    assert failures["nan.nii.gz"][1].startswith("non-finite")
    assert failures["notes.png"][1].startswith("corrupt")
    assert failures["gap_series"][1].startswith("bad geometry: a gap")
    for name in failures:
        assert name in log
    assert "4 of 6 inputs failed" in log and "4 inputs failed; see the log and failed.csv" in log
    assert "Traceback" not in log
    assert "[1/6]" in log and "[6/6]" in log  # one progress line per input
    assert "truncated.nii.gz FAILED (read)" in log

    client, runs = _mlflow_runs(trained["root"] / "eval" / "mlruns.db", "dex_seg3d")
    run = runs["broken_inputs"]
    assert run.info.status == "FAILED"
    assert run.data.metrics["failed_inputs"] == 4 and run.data.metrics["predicted_inputs"] == 2
    assert "failures/failed.csv" in _artifacts(client, run.info.run_id)


def test_input_files_in_several_folders_write_only_under_output_dir(trained, hippocampus, tmp_path):
    """``--input_files`` from different folders (and a name shared by two of them) with a far-away output_dir: every
    prediction lies under output_dir (the old default input_dir made SaveImage climb out of it)."""
    first, second = (tmp_path / "x" / "nrrd", tmp_path / "a" / "b" / "in")
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    name = sorted(p.name for p in (hippocampus / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    shutil.copy(hippocampus / "imagesTr" / name, first / "case.nii.gz")
    shutil.copy(hippocampus / "imagesTr" / name, second / "case.nii.gz")
    before = _digest(tmp_path)
    output = tmp_path / "t" / "x" / "y" / "z" / "out"
    overrides = {**NETWORK, "bundle_root": str(trained["root"]), "output_dir": str(output), "num_workers": 0,
                 "input_files": [str(first / "case.nii.gz"), str(second / "case.nii.gz")], "overlay_images": 0}
    _run_bundle([str(CONFIGS / "inference.json")], overrides)
    assert {k: v for k, v in _digest(tmp_path).items() if not k.startswith("t/")} == before
    assert files_under(output) == {"x/nrrd/case_seg.nii.gz", "a/b/in/case_seg.nii.gz"}

    overrides["output_dir"] = str(second)
    proc = _run_bundle([str(CONFIGS / "inference.json")], overrides, expect_exit=1)
    assert f"output_dir {second} is the input folder {second}" in proc.stdout + proc.stderr
    assert {k: v for k, v in _digest(tmp_path).items() if not k.startswith("t/")} == before


def test_inference_writes_dicom_seg_of_a_real_series(trained, shared_data, tmp_path):
    """``output_format dicom_seg`` on a real MR series (PGBM-001 T1post, copied): a DICOM SEG under ``output_dir``
    whose decoded labels equal the NIfTI output of the same run voxel by voxel; a NIfTI input is refused up front."""
    import nibabel as nib
    import pydicom
    from test_dicom_seg import seg_on_nifti_grid

    inputs = tmp_path / "study"
    shutil.copytree(shared_data / "mr" / "pgbm001_dicom" / "T1post", inputs / "T1post")
    before = _digest(inputs)
    base = {**NETWORK, "bundle_root": str(trained["root"]), "input_dir": str(inputs), "num_workers": 0,
            "overlap": 0.0, "pixdim": [3.0, 3.0, 3.0], "overlay_images": 0, "mlflow_tracking": False}
    for fmt in ("nifti", "dicom_seg"):
        _run_bundle([str(CONFIGS / "inference.json")], {**base, "output_format": fmt, "output_dir": str(tmp_path / fmt)})
    assert _digest(inputs) == before
    assert files_under(tmp_path / "dicom_seg") == {"T1post_seg.dcm"}
    nifti = nib.load(str(tmp_path / "nifti" / "T1post_seg.nii.gz"))
    array, affine = seg_on_nifti_grid(tmp_path / "dicom_seg" / "T1post_seg.dcm", nifti.affine)
    np.testing.assert_allclose(affine, nifti.affine, atol=1e-3)
    np.testing.assert_array_equal(array, np.asarray(nifti.dataobj))
    seg = pydicom.dcmread(str(tmp_path / "dicom_seg" / "T1post_seg.dcm"))
    source = pydicom.dcmread(str(inputs / "T1post" / "000000.dcm"), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]

    shutil.copy(sorted((shared_data / "mr" / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0], inputs / "volume.nii.gz")
    proc = _run_bundle([str(CONFIGS / "inference.json")],
                       {**base, "output_format": "dicom_seg", "output_dir": str(tmp_path / "refused")}, expect_exit=1)
    assert "needs DICOM inputs" in proc.stderr and "volume.nii.gz (nifti)" in proc.stderr
    assert not (tmp_path / "refused").exists()


def test_verify_metadata():
    from monai.bundle import verify_metadata

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["schema"].rsplit("/", 1)[-1] == SCHEMA.name
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "anterior", "2": "posterior"}
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    for mode in ("experts", "director"):
        verify_net_in_out(
            net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "train.json"),
            device="cpu", finetune_mode=mode, **NETWORK,
            **{"_meta_#network_data_format#inputs#image#spatial_shape": NETWORK["roi_size"],
               "_meta_#network_data_format#outputs#pred#spatial_shape": NETWORK["roi_size"]},
        )


def test_ckpt_export_matches_checkpoint(trained):
    export_and_compare(trained["root"], CONFIGS, NETWORK, INPUT_SHAPE, batch=2, tolerance=1e-4)


def test_checkpoint_errors_are_clear(tmp_path, pretrain_models):
    """A dense file given as DEX, a missing file, and an encoder of another width all stop with a clear message."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import ViT

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(tmp_path), **NETWORK, "hidden_size": 60, "num_heads": 2})
    net = parser.get_parsed_content("network_def")
    from dex_monai.engines.initialise import initialise_network

    with pytest.raises(ValueError, match=r"pretrained checkpoint .*model.pt does not fit DEXUNETR[\s\S]*mismatched[\s\S]*cls_token"):
        initialise_network(net, "dex", pretrain_models)
    dense = tmp_path / "vit.pt"
    torch.save(ViT(1, 32, 16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=2).state_dict(), dense)
    with pytest.raises(ValueError, match="use init='dense'"):
        initialise_network(net, "dex", dense)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        initialise_network(net, "dex", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown init"):
        initialise_network(net, "imagenet", dense)
