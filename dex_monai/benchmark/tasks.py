# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The transfer benchmark's data: downstream tasks from ``../shared/data`` (2D/3D, segmentation/classification, several
modalities) and the multi-modality pre-training images, all read through the project's checked reader layer
(:class:`dex_monai.transforms.LoadMultiModalImage`). Evaluation splits are never used for pre-training."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dex_monai.benchmark.config import BenchmarkConfig
from dex_monai.transforms.io import LoadMultiModalImage

__all__ = [
    "TASKS", "Task", "TaskData", "build_pretraining_images", "collect_pretraining_pools", "draw_images", "task_images_2d",
]


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)


IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class TaskData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    spatial_dims: int
    kind: str  # "classification" | "segmentation"
    modality: str
    train_modalities: list[str] | None = None  # per training item, for tasks that mix modalities


@dataclass
class Task:
    name: str
    modality: str
    kind: str
    spatial_dims: int
    loader: Callable[[Path, BenchmarkConfig, np.random.Generator], TaskData]
    source: str


def _resize(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """``[N, C, *S] -> [N, C, *size]``."""
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    if mode == "bilinear" and x.dim() == 5:
        mode = "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, **kwargs)


def _to_rgb_normalised(grey01: torch.Tensor) -> torch.Tensor:
    """``[N, 1 or 3, H, W]`` in [0, 1] -> ImageNet-normalised ``[N, 3, H, W]``."""
    rgb = grey01.expand(-1, 3, -1, -1) if grey01.shape[1] == 1 else grey01
    return (rgb - IMAGENET_MEAN) / IMAGENET_STD


def _npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data {path} is missing")
    with np.load(path, allow_pickle=False) as data:
        return data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)


def _split(n: int, eval_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_eval = max(1, int(round(n * eval_fraction)))
    return order[n_eval:], order[:n_eval]


@functools.lru_cache(maxsize=2)
def _loader(label: bool) -> LoadMultiModalImage:
    return LoadMultiModalImage(label=label)  # one per kind: MONAI's LoadImage announces its readers when built


def _read_png_grey(path: Path, size: int, label: bool = False) -> torch.Tensor:
    img = _loader(label)(path)
    img = torch.as_tensor(np.asarray(img), dtype=torch.float32)
    if img.shape[0] >= 3:
        img = img[:3].mean(0, keepdim=True)
    img = img[:1] / 255.0
    # the readers give [C, W, H] (MONAI's order); transpose back to rows x columns
    img = img.transpose(-1, -2)
    return _resize(img.unsqueeze(0), (size, size))[0]


def load_busi(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    folder = root / "us" / "busi"
    classes = ["benign", "malignant", "normal"]
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (folder / name).glob("*.png") if "_mask" not in p.name)
        files += found
        labels += [c] * len(found)
    if not files:
        raise FileNotFoundError(f"no BUSI images under {folder}")
    train_idx, eval_idx = _split(len(files), 0.3, rng)
    train_idx, eval_idx = train_idx[: cfg.max_train], eval_idx[: cfg.max_eval]
    load = lambda idx: torch.stack([_read_png_grey(files[i], cfg.img_size) for i in idx])  # noqa: E731
    y = torch.tensor(labels)
    return TaskData(
        _to_rgb_normalised(load(train_idx)), y[train_idx], _to_rgb_normalised(load(eval_idx)), y[eval_idx], 3, 2,
        "classification", "ultrasound",
    )


def _load_medmnist_2d(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator, file: str,
                      modality: str) -> TaskData:
    """A 2-class 2D MedMNIST task: its training split to train, its test split to evaluate (each capped at random)."""
    path = root / "medmnist" / file
    tx, ty = _npz(path, "train")
    ex, ey = _npz(path, "test")
    ti = rng.permutation(len(tx))[: cfg.max_train]
    ei = rng.permutation(len(ex))[: cfg.max_eval]
    prep = lambda a: _to_rgb_normalised(_resize(torch.from_numpy(a).float().unsqueeze(1) / 255.0, (cfg.img_size,) * 2))  # noqa: E731
    return TaskData(prep(tx[ti]), torch.from_numpy(ty[ti]).long(), prep(ex[ei]), torch.from_numpy(ey[ei]).long(), 2, 2,
                    "classification", modality)


def load_pneumonia(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    """PneumoniaMNIST (chest X-ray, normal vs pneumonia)."""
    return _load_medmnist_2d(root, cfg, rng, "pneumoniamnist.npz", "X-ray")


def load_breast(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    """BreastMNIST (ultrasound, benign/normal vs malignant)."""
    return _load_medmnist_2d(root, cfg, rng, "breastmnist.npz", "ultrasound")


def load_em_membranes(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    folder = root / "em" / "isbi2012"
    images = sorted((folder / "image").glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    if not images:
        raise FileNotFoundError(f"no EM images under {folder / 'image'}")
    # tiles of 128 x 128 from each 512 x 512 image, resized to the training size
    xs, ys = [], []
    for path in images:
        img = _read_png_grey(path, 512)
        lab = _read_png_grey(folder / "label" / path.name, 512, label=True)
        for r in range(0, 512, 128):
            for c in range(0, 512, 128):
                xs.append(_resize(img[None, :, r : r + 128, c : c + 128], (cfg.img_size,) * 2)[0])
                # membranes are dark (0) in the ISBI labels: class 1 = membrane
                tile = _resize(lab[None, :, r : r + 128, c : c + 128], (cfg.img_size,) * 2, mode="nearest")[0]
                ys.append((tile < 0.5).long())
    n_images = len(images)
    train_images, eval_images = _split(n_images, 0.3, rng)
    tiles = 16
    ti = np.concatenate([np.arange(i * tiles, (i + 1) * tiles) for i in train_images])[: cfg.max_train]
    ei = np.concatenate([np.arange(i * tiles, (i + 1) * tiles) for i in eval_images])[: cfg.max_eval]
    x, y = torch.stack(xs), torch.stack(ys)
    return TaskData(_to_rgb_normalised(x[ti]), y[ti], _to_rgb_normalised(x[ei]), y[ei], 2, 2, "segmentation", "pathology")


def load_hippocampus(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    folder = root / "mr" / "hippocampus"
    images = sorted((folder / "imagesTr").glob("*.nii.gz"))
    if not images:
        raise FileNotFoundError(f"no hippocampus volumes under {folder / 'imagesTr'}")
    train_idx, eval_idx = _split(len(images), 0.3, rng)
    reader, label_reader = _loader(False), _loader(True)
    from dex_monai.transforms.intensity import ModalityNormalize

    normalise = ModalityNormalize()

    def load(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in idx:
            img = normalise(reader(str(images[i])), "MR")
            lab = label_reader(str(folder / "labelsTr" / images[i].name))
            size = (cfg.volume_size,) * 3
            xs.append(_resize(torch.as_tensor(np.asarray(img), dtype=torch.float32)[None], size)[0])
            ys.append(_resize(torch.as_tensor(np.asarray(lab), dtype=torch.float32)[None], size, mode="nearest")[0].long())
        return torch.stack(xs), torch.stack(ys)

    tx, ty = load(train_idx[: cfg.max_train])
    ex, ey = load(eval_idx[: cfg.max_eval])
    return TaskData(tx, ty, ex, ey, 3, 3, "segmentation", "MR")


def load_adrenal(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    path = root / "medmnist" / "adrenalmnist3d.npz"
    tx, ty = _npz(path, "train")
    ex, ey = _npz(path, "test")
    ti = rng.permutation(len(tx))[: cfg.max_train]
    ei = rng.permutation(len(ex))[: cfg.max_eval]
    prep = lambda a: _resize(torch.from_numpy(a).float().unsqueeze(1) / 255.0, (cfg.volume_size,) * 3)  # noqa: E731
    return TaskData(prep(tx[ti]), torch.from_numpy(ty[ti]).long(), prep(ex[ei]), torch.from_numpy(ey[ei]).long(), 2, 3,
                    "classification", "CT")


def load_mixed_foreground(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    """Two modalities in one binary segmentation task: MR hippocampus slices and EM membranes (foreground vs rest)."""
    em = load_em_membranes(root, cfg, np.random.default_rng(cfg.seed))
    hippo = load_hippocampus(root, replace(cfg, volume_size=cfg.img_size), rng)

    def slices(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = x.shape[-1] // 2
        return _to_rgb_normalised(x[..., mid]), (y[..., mid] > 0).long()

    hx, hy = slices(hippo.train_x, hippo.train_y)
    ex_, ey_ = slices(hippo.eval_x, hippo.eval_y)
    train_x, train_y = torch.cat([em.train_x, hx]), torch.cat([em.train_y, hy])
    modalities = ["pathology"] * len(em.train_x) + ["MR"] * len(hx)
    return TaskData(train_x, train_y, torch.cat([em.eval_x, ex_]), torch.cat([em.eval_y, ey_]), 2, 2, "segmentation",
                    "pathology+MR", train_modalities=modalities)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("busi_cls", "ultrasound", "classification", 2, load_busi, "us/busi"),
        Task("pneumonia_cls", "X-ray", "classification", 2, load_pneumonia, "medmnist/pneumoniamnist.npz"),
        Task("em_membrane_seg", "pathology", "segmentation", 2, load_em_membranes, "em/isbi2012"),
        Task("hippocampus_seg3d", "MR", "segmentation", 3, load_hippocampus, "mr/hippocampus"),
        Task("adrenal_cls3d", "CT", "classification", 3, load_adrenal, "medmnist/adrenalmnist3d.npz"),
        Task("breast_cls", "ultrasound", "classification", 2, load_breast, "medmnist/breastmnist.npz"),
        Task("mixed_seg2d", "pathology+MR", "segmentation", 2, load_mixed_foreground, "em/isbi2012 + mr/hippocampus"),
    )
}


def collect_pretraining_pools(root: Path, cfg: BenchmarkConfig) -> dict[str, list[torch.Tensor]]:
    """Every usable multi-modality 2D pre-training image, per modality, as ``[1, S, S]`` tensors in [0, 1].

    CT and MR volumes are sliced (slices with under 5 % foreground dropped) and normalised per modality (CT window
    [-200, 400] HU, MR 1st-99th percentile); 8-bit images are divided by 255. Images of the downstream evaluation
    splits are not used: hippocampus and ISBI contribute only files outside the evaluation split of the same seed,
    MedMNIST only its training split.
    """
    from dex_monai.transforms.intensity import ModalityNormalize

    normalise = ModalityNormalize()
    reader = _loader(False)
    size = (cfg.img_size, cfg.img_size)
    pools: dict[str, list[torch.Tensor]] = {}

    def add(modality: str, grey01: torch.Tensor) -> None:
        pools.setdefault(modality, []).append(_resize(grey01[None], size)[0])

    def add_volume(path: Path, modality: str, every: int = 1) -> None:
        vol = torch.as_tensor(np.asarray(normalise(reader(str(path)), modality)), dtype=torch.float32)[0]
        for z in range(0, vol.shape[-1], every):
            sl = vol[..., z]
            if (sl > 0.05).float().mean() >= 0.05:
                add(modality, sl[None])

    for name in ("example_ct.nii.gz", "example_ct_sm.nii.gz"):
        if (root / "ct" / "totalseg_nifti" / name).is_file():
            add_volume(root / "ct" / "totalseg_nifti" / name, "CT")
    hippo = sorted((root / "mr" / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    train_hippo = _split(len(hippo), 0.3, np.random.default_rng(cfg.seed))[0] if hippo else []
    for i in list(train_hippo)[:12]:
        add_volume(hippo[i], "MR", every=3)
    if (root / "mr" / "totalseg_nifti" / "example_mr_sm.nii.gz").is_file():
        add_volume(root / "mr" / "totalseg_nifti" / "example_mr_sm.nii.gz", "MR")
    for npz, modality in (("pneumoniamnist.npz", "X-ray"), ("breastmnist.npz", "ultrasound")):
        path = root / "medmnist" / npz
        if path.is_file():
            images, _ = _npz(path, "train")
            limit = 4 * max(cfg.pretrain_images_per_modality, cfg.probe_images_per_modality)
            for i in np.random.default_rng(cfg.seed).permutation(len(images))[:limit]:
                add(modality, torch.from_numpy(images[i]).float()[None] / 255.0)
    em = sorted((root / "em" / "isbi2012" / "image").glob("*.png"))
    if em:
        train_em, _ = _split(len(em), 0.3, np.random.default_rng(cfg.seed))
        for i in train_em:
            img = _read_png_grey(em[i], 512)
            for r in range(0, 512, 128):
                for c in range(0, 512, 128):
                    add("pathology", img[:, r : r + 128, c : c + 128])
    if not pools:
        raise FileNotFoundError(f"no pre-training images found under {root}")
    return pools


def draw_images(
    pools: dict[str, list[torch.Tensor]], rng: np.random.Generator, per_modality: int
) -> tuple[torch.Tensor, list[str]]:
    """Up to ``per_modality`` images of each modality: ImageNet-normalised ``[N, 3, S, S]`` and modality names."""
    xs, modalities = [], []
    for modality, items in sorted(pools.items()):
        picks = rng.permutation(len(items))[:per_modality]
        xs += [items[i] for i in picks]
        modalities += [modality] * len(picks)
    return _to_rgb_normalised(torch.stack(xs)), modalities


def build_pretraining_images(
    root: Path, cfg: BenchmarkConfig, rng: np.random.Generator, per_modality: int
) -> tuple[torch.Tensor, list[str]]:
    """:func:`collect_pretraining_pools` then :func:`draw_images`."""
    return draw_images(collect_pretraining_pools(root, cfg), rng, per_modality)


def task_images_2d(data: TaskData, cfg: BenchmarkConfig) -> torch.Tensor:
    """A task's training images as 2D pre-training sees them, ``[M, 3, S, S]`` ImageNet-normalised (TD-Calib): 2D
    tasks as they are; volumes ``[N, C, X, Y, Z]`` in [0, 1] cut into slices along the slicing axis (the last) and
    resized to ``img_size``."""
    x = data.train_x
    if data.spatial_dims == 3:
        slices = x.movedim(-1, 1).reshape(-1, x.shape[1], x.shape[2], x.shape[3])  # [N * Z, C, X, Y]
        x = _to_rgb_normalised(_resize(slices, (cfg.img_size,) * 2))
    return x
