"""The project's main job: the whole path a user takes, on data the project makes, tracked in one MLflow store.

1. pre-train a small DEX MAE with ``bundles/dex_pretrain`` on a generated multi-modality set;
2. fine-tune ``bundles/dex_seg2d`` from that checkpoint on a generated 2D segmentation task;
3. run the bundle's inference on held-out generated images;
4. print where the MLflow runs, the checkpoints and the predictions are.

Every step is a ``python -m monai.bundle run`` of the real bundles. Run with ``python -m dex_monai.main_job``
(``bash scripts/main.sh`` sets the environment up first). ``--out DIR`` (default ``outputs/main_job``) receives
everything; ``--epochs``/``--finetune-epochs`` scale the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dex_monai.data.synthetic import make_segmentation_set

REPO_ROOT = Path(__file__).resolve().parents[1]

#: encoder shared by pre-training and fine-tuning (the fine-tuning bundle must match the checkpoint)
ENCODER = {"hidden_size": 96, "mlp_dim": 384, "num_layers": 4, "num_heads": 4, "num_experts": 4, "top_k": 2}


def _bundle(configs: list[str], overrides: dict, log: Path) -> None:
    config_arg = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    # bundle_root is "." in the bundles (model-zoo style): name the bundle folder when running from the repository
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg,
           "--bundle_root", str(REPO_ROOT / Path(configs[0]).parent.parent)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"\n$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            if " - INFO - Epoch" in line or "Error" in line or "error:" in line:
                print("  " + line.rstrip()[:160], flush=True)
        code = proc.wait()
    if code != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"step failed (exit {code}) after {time.perf_counter() - start:.0f} s; last lines of {log}:\n"
                         + "\n".join(tail))
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/main_job", help="folder for everything the job writes")
    parser.add_argument("--epochs", type=int, default=3, help="pre-training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--images-per-modality", type=int, default=6, help="generated pre-training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = (REPO_ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from monai.utils import path_to_sqlite_uri

    tracking_uri = path_to_sqlite_uri(str(out / "mlruns.db"))
    started = time.perf_counter()
    pretrain_dir = out / "pretrain"
    encoder = {f"network_def#{k}": v for k, v in ENCODER.items()}

    print("[1/3] pre-training DEX MAE on a generated multi-modality set", flush=True)
    _bundle(
        ["bundles/dex_pretrain/configs/train.json"],
        {
            "epochs": args.epochs, "dataset_dir": pretrain_dir / "data", "ckpt_dir": pretrain_dir / "models",
            "output_dir": pretrain_dir / "eval", "tracking_uri": tracking_uri, "synthetic_n_per_modality":
            args.images_per_modality, "synthetic_size": 64, "img_size": 64, "patch_size": 16, "batch_size": 8,
            "base_lr": 0.05, "num_workers": 0, "progress_bar": False, "seed": args.seed, **encoder,
        },
        out / "pretrain.log",
    )
    checkpoint = pretrain_dir / "models" / "model.pt"

    print("[2/3] fine-tuning dex_seg2d (UNETR, DEX experts) from that checkpoint", flush=True)
    seg_data = out / "seg2d_data"
    make_segmentation_set(seg_data / "train", 24, 64, args.seed)
    make_segmentation_set(seg_data / "test", 4, 64, args.seed + 1)
    seg_dir = out / "seg2d"
    seg_common = {
        "dataset_dir": seg_data / "train", "ckpt_dir": seg_dir / "models", "output_dir": seg_dir / "eval",
        "roi_size": "[64,64]", "patch_size": 16, "feature_size": 8, "num_workers": 0, "modality": "range", **ENCODER,
    }
    _bundle(
        ["bundles/dex_seg2d/configs/train.json"],
        {**seg_common, "init": "dex", "pretrained_checkpoint": checkpoint, "finetune_mode": "experts",
         "epochs": args.finetune_epochs, "batch_size": 4, "lr": 3e-4, "warmup_epochs": 1,
         "tracking_uri": tracking_uri, "seed": args.seed},
        out / "seg2d_train.log",
    )

    print("[3/3] inference on held-out generated images", flush=True)
    predictions = out / "predictions"
    _bundle(
        ["bundles/dex_seg2d/configs/inference.json"],
        {**seg_common, "input_dir": seg_data / "test" / "image", "output_dir": predictions,
         "tracking_uri": tracking_uri},
        out / "seg2d_inference.log",
    )

    written = sorted(p for p in predictions.rglob("*") if p.is_file())
    print("\n=== main job finished in {:.0f} s ===".format(time.perf_counter() - started))
    print(f"MLflow store      : {tracking_uri}")
    print(f"  look at it with : mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
    print(f"  compare runs    : python -m dex_monai.compare --tracking-uri {tracking_uri} "
          f"--experiment dex_pretrain --experiment dex_seg2d --out {out / 'comparison'}")
    print(f"DEX checkpoint    : {checkpoint}")
    print(f"fine-tuned model  : {seg_dir / 'models' / 'model.pt'}")
    print(f"predictions       : {predictions} ({len(written)} files)")
    print(f"logs              : {out}/*.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
