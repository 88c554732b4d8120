"""The README's main job runs end to end on generated data and leaves what it announces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    out = tmp_path / "job"
    proc = subprocess.run(
        [sys.executable, "-m", "dex_monai.main_job", "--out", str(out), "--epochs", "1", "--finetune-epochs", "1",
         "--images-per-modality", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "main job finished" in proc.stdout and "MLflow store" in proc.stdout
    assert (out / "pretrain" / "models" / "model.pt").is_file()
    assert (out / "seg2d" / "models" / "model.pt").is_file()
    predictions = sorted((out / "predictions").rglob("*_seg.png"))
    assert len(predictions) == 4
    assert (out / "predictions" / "overlays" / "inference_epoch_1.png").is_file()  # every output under output_dir
    from PIL import Image

    for path in predictions:
        labels = np.asarray(Image.open(path))
        assert labels.shape == (64, 64) and set(np.unique(labels)) <= {0, 1}  # class indices, not scaled to 255

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    names = {e.name for e in client.search_experiments()}
    assert {"dex_pretrain", "dex_seg2d"} <= names
