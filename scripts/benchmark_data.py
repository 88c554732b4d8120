#!/usr/bin/env python
"""Data-pipeline throughput: slices per second, uncached and cached, measured in one run.

Measures, on the real scans of ``../shared/data`` (or ``$DEX_SHARED_DATA``; synthetic data when absent):

1. DICOM series -> normalised 2-D slices (decode with ITK/GDCM incl. JPEG 2000, normalise, slice, store);
2. NIfTI volumes -> normalised 2-D slices;
3. a cached epoch over the same slices (the decoded slices read back from the persistent cache).

An "epoch" feeds every normalised slice once (``dataset[i]`` for all ``i``), in one process with one
torch thread (as a DataLoader worker). The run fails (exit status 1) if the cached epoch decodes
anything or is not at least ``--min-speedup`` (3) times faster.

Then, to see whether data or compute bounds training on this machine, it prints side by side (4.) the slices/s of
the training loader (``SliceDataset`` from the persistent cache + the 2-D augmentation + the
``ModalityBalancedSampler``, in a ``torch.utils.data.DataLoader`` with ``--loader-workers`` processes, batch
``--batch``) and (5.) the images/s of a DEX pre-training step (forward with GEMA, backward, AdamW) of
``--step-config`` (``S``: embed 192, depth 6, 8 experts top-2, patch 8, decoder 128x2) on ``--device``, batch
``--batch``. ``--loader-workers 0`` skips both. ``--augment`` adds the random 2-D
augmentation (crop, flip, rotation, ImageNet normalisation) on both sides, for information only: it
costs the same with or without the cache, so it is not part of the 3x requirement.

Usage::

    python scripts/benchmark_data.py [--data DIR] [--cache-dir DIR] [--max-hippocampus 40] [--augment] \\
        [--loader-workers 2] [--batch 32] [--loader-batches 20] [--step-config S] [--device cpu] [--steps 5] [--step-threads 0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _shared_data(arg: str | None) -> Path | None:
    root = Path(arg or os.environ.get("DEX_SHARED_DATA", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


def _items(data: Path | None, work: Path, max_hippocampus: int) -> tuple[list[dict], list[dict], str]:
    from dex_monai.data import ModalityRules, build_datalist, load_datalist

    if data is not None:
        rules = ModalityRules.load(REPO / "configs" / "modality_rules_shared_data.yaml")
        dicom_src = [data / "ct" / "totalseg_dicom" / "series", data / "mr" / "pgbm001_dicom"]
        hippo = sorted((data / "mr" / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:max_hippocampus]
        nifti_src = [data / "ct" / "totalseg_nifti", data / "mr" / "totalseg_nifti", *hippo]
        what = f"real scans in {data}"
    else:
        import nibabel as nib

        from dex_monai.data import make_synthetic_dataset
        from dex_monai.data.synthetic import write_dicom_series

        dl = make_synthetic_dataset(work / "synthetic", n_per_modality=6, size=128, modalities=("CT", "MR"))
        rules = ModalityRules([("*/synthetic/ct/*", "CT"), ("*/synthetic/mr/*", "MR")])
        for i, item in enumerate(x for x in load_datalist(dl) if x["modality"] == "CT"):
            write_dicom_series(work / "dicom" / f"series{i}", nib.load(item["image"]).get_fdata().astype("int16"))
        dicom_src = [work / "dicom"]
        nifti_src = [work / "synthetic" / "ct", work / "synthetic" / "mr"]
        what = "synthetic data (shared data folder not found)"
    dicom = build_datalist(dicom_src, rules=rules, check_pixels=False, progress=False)["training"]
    nifti = build_datalist(nifti_src, rules=rules, check_pixels=False, progress=False)["training"]
    return dicom, nifti, what


def _epoch(items: list[dict], cache_dir: Path, transform) -> tuple[int, float, int]:
    """Build the dataset (decoding what is not cached) and feed every slice once: (slices, seconds, decoded units)."""
    from dex_monai.data import SliceDataset

    t0 = time.perf_counter()
    ds = SliceDataset(items, transform=transform, cache_dir=cache_dir, progress=False)
    for i in range(len(ds)):
        ds[i]
    return len(ds), time.perf_counter() - t0, ds.decoded_units


STEP_CONFIGS = {  # the DEX MAE of scripts/benchmark_dex.py's configs S and B (batch given apart)
    "S": dict(patch_size=8, hidden_size=192, mlp_dim=768, num_layers=6, num_heads=3, num_experts=8, top_k=2,
              decoder_hidden_size=128, decoder_mlp_dim=512, decoder_num_layers=2, decoder_num_heads=4),
    "B": dict(patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, num_experts=8, top_k=2,
              decoder_hidden_size=512, decoder_mlp_dim=2048, decoder_num_layers=8, decoder_num_heads=16),
}  # fmt: skip


def loader_slices_per_second(items: list[dict], cache: Path, img_size: int, workers: int, batch: int,
                             batches: int) -> tuple[float, int]:  # fmt: skip
    """Slices/s of the training loader reading the (filled) persistent cache; returns (slices/s, decoded units)."""
    import torch

    from dex_monai.data import ModalityBalancedSampler, SliceDataset
    from dex_monai.transforms import pretrain_2d_augment_transforms

    ds = SliceDataset(items, transform=pretrain_2d_augment_transforms(img_size), cache_dir=cache, progress=False)
    sampler = ModalityBalancedSampler(ds.modalities, num_samples=batch * (batches + 2))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                         persistent_workers=False)  # fmt: skip
    it = iter(loader)
    next(it), next(it)  # workers started and warm
    t0 = time.perf_counter()
    n = sum(int(b["image"].shape[0]) for b in it)
    return n / (time.perf_counter() - t0), ds.decoded_units


def dex_images_per_second(config: str, img_size: int, batch: int, steps: int, device: str) -> float:
    """Images/s of DEX MAE pre-training steps (forward with GEMA, backward, fused AdamW); median of ``steps``."""
    import statistics

    import torch

    from dex_monai.networks import DEXMaskedAutoEncoder

    dev = torch.device(device)
    model = DEXMaskedAutoEncoder(in_channels=3, spatial_dims=2, img_size=img_size, masking_ratio=0.75,
                                 **STEP_CONFIGS[config]).to(dev).train()  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, fused=True)
    images = torch.rand(batch, 3, img_size, img_size, device=dev)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        _, out = model(images)
        loss = out["mae"] + 0.1 * out["alignment"] + 0.01 * out["balance"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="shared data folder (default $DEX_SHARED_DATA or ../shared/data)")
    p.add_argument("--cache-dir", default=None, help="slice cache folder (default: a temporary folder, removed)")
    p.add_argument("--max-hippocampus", type=int, default=40, help="hippocampus NIfTI volumes to include")
    p.add_argument("--augment", action="store_true", help="apply the 2-D augmentation pipeline in both epochs")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--min-speedup", type=float, default=3.0)
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (0: skip loader and step)")
    p.add_argument("--batch", type=int, default=32, help="batch of the loader and of the DEX step")
    p.add_argument("--loader-batches", type=int, default=20, help="timed loader batches")
    p.add_argument("--step-config", choices=sorted(STEP_CONFIGS), default="S")
    p.add_argument("--device", default="cpu", help="device of the DEX step")
    p.add_argument("--steps", type=int, default=5, help="timed DEX steps")
    p.add_argument("--step-threads", type=int, default=0, help="torch threads of the DEX step (0: every core)")
    args = p.parse_args(argv)

    import itk  # noqa: F401  (ITK loads its modules lazily: do it before timing)
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker; also steadier timings on a shared machine

    from dex_monai.transforms import pretrain_2d_augment_transforms

    itk.GDCMSeriesFileNames.New()
    work = Path(tempfile.mkdtemp(prefix="dex-bench-"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    if cache.exists():
        shutil.rmtree(cache)  # the first epochs must decode
    try:
        dicom, nifti, what = _items(_shared_data(args.data), work, args.max_hippocampus)
        transform = pretrain_2d_augment_transforms(args.img_size) if args.augment else None
        n_d, t_d, u_d = _epoch(dicom, cache, transform)
        n_n, t_n, u_n = _epoch(nifti, cache, transform)
        n_c, t_c, u_c = _epoch(dicom + nifti, cache, transform)
        if args.loader_workers > 0:
            loader_rate, u_l = loader_slices_per_second(dicom + nifti, cache, args.img_size, args.loader_workers,
                                                        args.batch, args.loader_batches)  # fmt: skip
            torch.set_num_threads(args.step_threads or os.cpu_count() or 1)
            step_rate = dex_images_per_second(args.step_config, args.img_size, args.batch, args.steps, args.device)
    finally:
        if not args.cache_dir:
            shutil.rmtree(work, ignore_errors=True)
    uncached = (n_d + n_n) / (t_d + t_n)
    cached = n_c / t_c
    speedup = cached / uncached
    print(f"data: {what}; {'with' if args.augment else 'without'} 2-D augmentation")
    print(f"{'pipeline':<40}{'units decoded':>14}{'slices':>8}{'seconds':>9}{'slices/s':>10}")
    print(f"{'DICOM series -> normalised 2-D slices':<40}{u_d:>14}{n_d:>8}{t_d:>9.2f}{n_d / t_d:>10.1f}")
    print(f"{'NIfTI -> normalised 2-D slices':<40}{u_n:>14}{n_n:>8}{t_n:>9.2f}{n_n / t_n:>10.1f}")
    print(f"{'uncached epoch (both of the above)':<40}{u_d + u_n:>14}{n_d + n_n:>8}{t_d + t_n:>9.2f}{uncached:>10.1f}")
    print(f"{'cached epoch (same slices)':<40}{u_c:>14}{n_c:>8}{t_c:>9.2f}{cached:>10.1f}")
    need = "information only with --augment" if args.augment else f"required: >= {args.min_speedup:g}x"
    print(f"cached / uncached: {speedup:.1f}x ({need})")
    if args.loader_workers > 0:
        bound = "data (the loader)" if loader_rate < step_rate else "compute (the DEX step)"
        print(f"training loader from the cache, {args.loader_workers} workers, batch {args.batch}: "
              f"{loader_rate:.0f} slices/s")  # fmt: skip
        print(f"DEX step, config {args.step_config} {args.img_size}x{args.img_size}, batch {args.batch}, "
              f"{args.device} ({torch.get_num_threads()} threads): {step_rate:.0f} images/s")  # fmt: skip
        print(f"training on this machine is bound by {bound}: loader / step = {loader_rate / step_rate:.2f}")
        if u_l != 0:
            print("FAIL: the loader decoded images again", file=sys.stderr)
            return 1
    if u_c != 0:
        print("FAIL: the cached epoch decoded images again", file=sys.stderr)
        return 1
    if speedup < args.min_speedup and not args.augment:
        print("FAIL: the cached epoch is not fast enough", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
