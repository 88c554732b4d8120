"""Transfer benchmark: does a DEX encoder transfer better than a monolithic MAE on multi-modality data?

Protocol (the paper's, at a size a laptop can run and a GPU can scale):

1. pre-train on the same multi-modality 2D images, for the same steps and seed: ``dex`` (DEX MAE) and ``dense``
   (an MAE of the same width and depth with plain MLPs); ``none`` is no pre-training;
2. fine-tune each initialisation on every downstream task (2D and 3D, segmentation and classification, several
   modalities) with AdamW, warm-up and cosine decay, Dice + cross-entropy or cross-entropy; evaluate on held-out data;
3. measure emergent modularity: per layer which experts each modality uses, the normalised mutual information
   between modality and expert choice, and for every encoder a linear probe's modality accuracy on its features.

Every pre-training and fine-tuning run is logged to one MLflow experiment; a summary run holds the table (markdown,
CSV) and the figures. 2D encoders initialise 3D tasks through :func:`~dex_monai.networks.kernel.adapt_patch_kernel` (inflated along the slicing axis)
(kernels inflated along depth).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dex_monai.networks import DEXClassifier, DEXMaskedAutoEncoder, DEXUNETR, load_encoder_weights

__all__ = ["BenchmarkConfig", "INITS", "Task", "TASKS", "run_transfer_benchmark", "build_pretraining_images"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class BenchmarkConfig:
    """Sizes and steps of one benchmark run; every field is a command-line flag of ``scripts/transfer_benchmark.py``."""

    data_root: str = "../shared/data"
    out_dir: str = "outputs/transfer_benchmark"
    tracking_uri: str | None = None
    experiment: str = "dex-transfer-benchmark"
    tasks: Sequence[str] = ("busi_cls", "pneumonia_cls", "em_membrane_seg", "hippocampus_seg3d")
    inits: Sequence[str] = ("dex", "dense", "none")
    dex_finetune_mode: str = "experts"
    gm_coord: bool = False
    gm_coord_alpha: float = 0.5
    umd_feature_weight: float = 1.0
    img_size: int = 64
    volume_size: int = 32
    patch_size: int = 8
    hidden_size: int = 96
    mlp_dim: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    decoder_hidden_size: int = 64
    decoder_num_layers: int = 1
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    lambda_co: float = 0.01
    lambda_bal: float = 0.01
    pretrain_images_per_modality: int = 300
    finetune_steps: int = 150
    finetune_batch: int = 16
    finetune_lr: float = 3e-4
    warmup_fraction: float = 0.1
    max_train: int = 400
    max_eval: int = 200
    probe_images_per_modality: int = 60
    seed: int = 0
    threads: int = 0
    extra_pretrain_options: dict = field(default_factory=dict)


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


#: initialisation name -> (pre-training kind or None, fine-tuning encoder settings)
INITS: dict[str, tuple[str | None, dict]] = {
    "dex": ("dex", {"mode": None}),  # fine-tuned through BenchmarkConfig.dex_finetune_mode
    "dex_director": ("dex", {"mode": "director"}),
    "dense": ("dense", {"dense": True}),
    "none": (None, {"dense": True}),
    "dex_umd": ("dex_umd", {"mode": None}),  # DEX MAE + UMD multi-level (EMA-teacher feature) reconstruction
    "m4oe": ("m4oe", {"mlp_type": "m4oe", "m4oe_stage": "gated"}),  # experts pre-trained on their own modality
}


@dataclass
class Task:
    name: str
    modality: str
    kind: str
    spatial_dims: int
    loader: Callable[[Path, BenchmarkConfig, np.random.Generator], TaskData]
    source: str


# ----------------------------------------------------------------------------------------------------------- data
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


def _read_png_grey(path: Path, size: int) -> torch.Tensor:
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, reader="PILReader", ensure_channel_first=True)(str(path))
    img = torch.as_tensor(np.asarray(img), dtype=torch.float32)
    if img.shape[0] >= 3:
        img = img[:3].mean(0, keepdim=True)
    img = img[:1] / 255.0
    # MONAI's PILReader gives [C, W, H]; transpose back to rows x columns
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


def load_pneumonia(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    path = root / "medmnist" / "pneumoniamnist.npz"
    tx, ty = _npz(path, "train")
    ex, ey = _npz(path, "test")
    ti = rng.permutation(len(tx))[: cfg.max_train]
    ei = rng.permutation(len(ex))[: cfg.max_eval]
    prep = lambda a: _to_rgb_normalised(_resize(torch.from_numpy(a).float().unsqueeze(1) / 255.0, (cfg.img_size,) * 2))  # noqa: E731
    return TaskData(prep(tx[ti]), torch.from_numpy(ty[ti]).long(), prep(ex[ei]), torch.from_numpy(ey[ei]).long(), 2, 2,
                    "classification", "X-ray")


def load_em_membranes(root: Path, cfg: BenchmarkConfig, rng: np.random.Generator) -> TaskData:
    folder = root / "em" / "isbi2012"
    images = sorted((folder / "image").glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    if not images:
        raise FileNotFoundError(f"no EM images under {folder / 'image'}")
    # tiles of 128 x 128 from each 512 x 512 image, resized to the training size
    xs, ys = [], []
    for path in images:
        img = _read_png_grey(path, 512)
        lab = _read_png_grey(folder / "label" / path.name, 512)
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
    from monai.transforms import LoadImage

    folder = root / "mr" / "hippocampus"
    images = sorted((folder / "imagesTr").glob("*.nii.gz"))
    if not images:
        raise FileNotFoundError(f"no hippocampus volumes under {folder / 'imagesTr'}")
    train_idx, eval_idx = _split(len(images), 0.3, rng)
    reader = LoadImage(image_only=True, ensure_channel_first=True)
    from dex_monai.transforms.intensity import ModalityNormalize

    normalise = ModalityNormalize()

    def load(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in idx:
            img = normalise(reader(str(images[i])), "MR")
            lab = reader(str(folder / "labelsTr" / images[i].name))
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
    hippo = load_hippocampus(root, BenchmarkConfig(**{**asdict(cfg), "volume_size": cfg.img_size}), rng)

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
    from monai.transforms import LoadImage

    from dex_monai.transforms.intensity import ModalityNormalize

    normalise = ModalityNormalize()
    reader = LoadImage(image_only=True, ensure_channel_first=True)
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


# ------------------------------------------------------------------------------------------------------ training
def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def _cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def _mlflow_run(mlflow, cfg: BenchmarkConfig, name: str, tags: dict, params: dict):
    run = mlflow.start_run(run_name=name, tags=tags)
    mlflow.log_params({k: (str(v)[:240]) for k, v in params.items()})
    return run


def _pretrain_options(kind: str, cfg: BenchmarkConfig, modality_names: Sequence[str]) -> dict:
    if kind == "dense":
        return {"dense": True}
    if kind == "dex_umd":
        return {"feature_reconstruction_weight": cfg.umd_feature_weight}
    if kind == "m4oe":
        return {"mlp_type": "m4oe", "modalities": tuple(modality_names), "m4oe_stage": "expert"}
    if kind == "dex":
        return {}
    raise ValueError(f"unknown pre-training kind {kind!r}")


def pretrain(
    kind: str, images: torch.Tensor, cfg: BenchmarkConfig, mlflow, tags: dict, out_dir: Path,
    modalities: Sequence[str] = (),
) -> tuple[DEXMaskedAutoEncoder, Path]:
    """Pre-train an MAE of ``kind`` (``dex``, ``dense``, ``dex_umd``, ``m4oe``) on ``images`` ``[N, 3, S, S]``.

    ``modalities`` names every image's modality (M4oE trains each expert on its own modality). Returns the model and
    its checkpoint path.
    """
    torch.manual_seed(cfg.seed)
    modality_names = sorted(set(modalities))
    model = DEXMaskedAutoEncoder(
        3, cfg.img_size, cfg.patch_size, spatial_dims=2, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_experts=cfg.num_experts, top_k=cfg.top_k,
        decoder_hidden_size=cfg.decoder_hidden_size, decoder_mlp_dim=4 * cfg.decoder_hidden_size,
        decoder_num_layers=cfg.decoder_num_layers, decoder_num_heads=4,
        **_pretrain_options(kind, cfg, modality_names), **cfg.extra_pretrain_options,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.pretrain_lr,
                                  weight_decay=0.05, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(cfg.seed)
    warmup = max(1, int(cfg.warmup_fraction * cfg.pretrain_steps))
    model.train()
    _ = _mlflow_run(mlflow, cfg, f"pretrain-{kind}", {**tags, "stage": "pretrain", "init": kind},
                      {**asdict(cfg), "stage": "pretrain", "init": kind}) if mlflow else None
    skipped = 0
    for step in tqdm(range(cfg.pretrain_steps), desc=f"pre-train {kind}", leave=False):
        lr = _cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.set_schedule_values(
            gema_momentum=_cosine_ramp(step, cfg.pretrain_steps, 0.99, 0.999),
            noise_std=_cosine_ramp(step, cfg.pretrain_steps, 1.0, 0.0),
        )
        idx = torch.randint(0, images.shape[0], (cfg.pretrain_batch,), generator=generator)
        batch = images[idx]
        if torch.rand((), generator=generator) < 0.5:
            batch = batch.flip(-1)
        if kind == "m4oe":
            model.encoder.set_modality_ids([modalities[i] for i in idx.tolist()])
        _, out = model(batch)
        loss = out["mae"] + out["feature"] + cfg.lambda_co * out["alignment"] + cfg.lambda_bal * out["balance"]
        if not torch.isfinite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if mlflow and (step % 10 == 0 or step == cfg.pretrain_steps - 1):
            mlflow.log_metrics({"loss": float(loss), "mae_loss": float(out["mae"]), "feature_loss": float(out["feature"]),
                                "alignment_loss": float(out["alignment"]), "balance_loss": float(out["balance"]),
                                "lr": lr}, step=step)
    if kind == "m4oe":
        model.encoder.set_modality_ids(None)
    path = out_dir / f"pretrain_{kind}.pt"
    torch.save({"model": model.state_dict()}, path)
    if mlflow:
        mlflow.log_metric("skipped_steps", skipped)
        mlflow.end_run()
    return model, path


def _build_downstream(
    task: Task, data: TaskData, cfg: BenchmarkConfig, init: str, modality_names: Sequence[str] = ()
) -> torch.nn.Module:
    in_channels = data.train_x.shape[1]
    size = cfg.img_size if task.spatial_dims == 2 else cfg.volume_size
    settings = dict(INITS[init][1])
    if "mode" in settings:
        settings["mode"] = settings["mode"] or cfg.dex_finetune_mode
    if settings.get("mlp_type") == "m4oe":
        settings["modalities"] = tuple(modality_names)
    kwargs = dict(
        hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_experts=cfg.num_experts, top_k=cfg.top_k, **settings,
    )
    if data.kind == "segmentation":
        return DEXUNETR(in_channels, data.num_classes, size, cfg.patch_size, spatial_dims=task.spatial_dims,
                        feature_size=8, **kwargs)
    return DEXClassifier(in_channels, data.num_classes, size, cfg.patch_size, spatial_dims=task.spatial_dims,
                         head_dropout=0.1, **kwargs)


def _evaluate(model: torch.nn.Module, data: TaskData, batch: int) -> dict[str, float]:
    from monai.metrics import DiceMetric, ROCAUCMetric

    model.eval()
    outputs = []
    with torch.no_grad():
        for i in range(0, data.eval_x.shape[0], batch):
            outputs.append(model(data.eval_x[i : i + batch]))
    logits = torch.cat(outputs)
    if data.kind == "classification":
        probs = logits.softmax(1)
        accuracy = float((probs.argmax(1) == data.eval_y).float().mean())
        # one-vs-rest AUC per class that has both positives and negatives in the evaluation set, averaged
        onehot = F.one_hot(data.eval_y, data.num_classes).float()
        per_class = []
        for c in range(data.num_classes):
            if 0 < onehot[:, c].sum() < len(onehot):
                metric = ROCAUCMetric()
                metric(probs[:, c : c + 1], onehot[:, c : c + 1])
                per_class.append(float(metric.aggregate()))
        auc = float(np.mean(per_class)) if per_class else float("nan")
        return {"score": auc, "auc": auc, "accuracy": accuracy}
    pred = F.one_hot(logits.argmax(1), data.num_classes).movedim(-1, 1).float()
    target = F.one_hot(data.eval_y[:, 0], data.num_classes).movedim(-1, 1).float()
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    dice(pred, target)
    per_class = dice.aggregate()
    mean_dice = float(torch.nanmean(per_class))
    return {"score": mean_dice, "dice": mean_dice}


def finetune(
    task: Task, data: TaskData, cfg: BenchmarkConfig, init: str, checkpoint: Path | None, mlflow, tags: dict,
    modality_names: Sequence[str] = (),
) -> dict[str, float]:
    """Fine-tune one initialisation on one task and return its held-out metrics (``score`` = AUC or Dice).

    With ``cfg.gm_coord`` and a task that mixes modalities, the loss is UMD's GM-Coord (:class:`GMCoordLoss`) and the
    final per-modality coefficients are returned as ``gm_coef_<modality>``.
    """
    from monai.losses import DiceCELoss

    from dex_monai.engines.gm_coord import GMCoordLoss

    torch.manual_seed(cfg.seed)
    model = _build_downstream(task, data, cfg, init, modality_names)
    notes = ""
    if checkpoint is not None:
        report = load_encoder_weights(model, checkpoint, strict=True)
        notes = "; ".join(report.notes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if data.kind == "segmentation" else torch.nn.CrossEntropyLoss()
    coordinated = cfg.gm_coord and data.train_modalities is not None
    if coordinated:
        loss_fn = GMCoordLoss(loss_fn, alpha=cfg.gm_coord_alpha)
    generator = torch.Generator().manual_seed(cfg.seed)
    warmup = max(1, int(cfg.warmup_fraction * cfg.finetune_steps))
    _ = _mlflow_run(mlflow, cfg, f"{task.name}-{init}", {**tags, "stage": "finetune", "init": init, "task": task.name},
                      {"task": task.name, "init": init, "modality": task.modality, "kind": data.kind,
                       "spatial_dims": task.spatial_dims, "finetune_steps": cfg.finetune_steps,
                       "finetune_lr": cfg.finetune_lr, "train_size": len(data.train_x), "eval_size": len(data.eval_x),
                       "init_notes": notes[:240]}) if mlflow else None
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(cfg.finetune_steps), desc=f"{task.name} <- {init}", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, cfg.finetune_steps, cfg.finetune_lr, warmup)
        idx = torch.randint(0, data.train_x.shape[0], (cfg.finetune_batch,), generator=generator)
        x, y = data.train_x[idx], data.train_y[idx]
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-1), (y.flip(-1) if data.kind == "segmentation" else y)
        if coordinated:
            loss_fn.set_modalities([data.train_modalities[i] for i in idx.tolist()])
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if mlflow and (step % 10 == 0 or step == cfg.finetune_steps - 1):
            mlflow.log_metric("train_loss", float(loss), step=step)
            if coordinated:
                mlflow.log_metrics({f"gm_coef_{m}": k for m, k in loss_fn.coefficients.items()}, step=step)
    metrics = _evaluate(model, data, cfg.finetune_batch)
    if coordinated:
        metrics.update({f"gm_coef_{m}": k for m, k in loss_fn.coefficients.items()})
    metrics["train_seconds"] = time.perf_counter() - start
    if mlflow:
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        mlflow.end_run()
    return metrics


# ---------------------------------------------------------------------------------------------------- modularity
def encoder_routing_and_features(
    model: DEXMaskedAutoEncoder | None, images: torch.Tensor, cfg: BenchmarkConfig, dense: bool
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per layer the top-k experts of every image ``[N, K]`` (empty for dense) and CLS features ``[N, D]``."""
    from dex_monai.networks import DEXViT

    if model is None:
        torch.manual_seed(cfg.seed)
        encoder = DEXViT(3, cfg.img_size, cfg.patch_size, spatial_dims=2, hidden_size=cfg.hidden_size,
                         mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, dense=True)
    else:
        encoder = model.encoder
    encoder.eval()
    routes: list[list[torch.Tensor]] = [[] for _ in encoder.dex_layers()]
    feats = []
    with torch.no_grad():
        for i in range(0, images.shape[0], 64):
            tokens, _ = encoder(images[i : i + 64])
            feats.append(tokens[:, 0])
            for layer, record in zip(encoder.dex_layers(), routes):
                record.append(layer.routing["indices"])
    return [torch.cat(r).numpy() for r in routes], torch.cat(feats).numpy()


# --------------------------------------------------------------------------------------------------------- driver
def _markdown_table(rows: dict[str, dict[str, float]], inits: Sequence[str], tasks: Sequence[str]) -> str:
    lines = ["| task | metric | " + " | ".join(inits) + " |", "|---|---|" + "---|" * len(inits)]
    for task in tasks:
        metric = "AUC" if TASKS[task].kind == "classification" else "Dice"
        cells = [f"{rows[task][i]:.4f}" if not math.isnan(rows[task][i]) else "n/a" for i in inits]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    means = [np.nanmean([rows[t][i] for t in tasks]) for i in inits]
    lines.append("| **mean** | | " + " | ".join(f"**{m:.4f}**" for m in means) + " |")
    return "\n".join(lines)


def run_transfer_benchmark(cfg: BenchmarkConfig) -> dict:
    """Run the whole protocol; returns ``{"table": {task: {init: score}}, "modularity": ..., "files": ...}``."""
    from dex_monai.analysis import (
        expert_usage,
        linear_probe_modality_accuracy,
        modality_expert_nmi,
        plot_modality_expert_heatmaps,
    )

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (give --data-root)")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    benchmark_id = uuid.uuid4().hex[:12]
    tags = {"benchmark_id": benchmark_id, "benchmark": "transfer"}

    mlflow = None
    if cfg.tracking_uri != "none":
        import mlflow as _mlflow

        from monai.utils import path_to_sqlite_uri

        uri = cfg.tracking_uri or path_to_sqlite_uri(str((out_dir / "mlruns.db").resolve()))
        _mlflow.set_tracking_uri(uri)
        if _mlflow.get_experiment_by_name(cfg.experiment) is None:
            _mlflow.create_experiment(cfg.experiment, artifact_location=(out_dir / "mlartifacts").resolve().as_uri())
        _mlflow.set_experiment(cfg.experiment)
        mlflow = _mlflow

    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    pools = collect_pretraining_pools(root, cfg)
    images, modalities = draw_images(pools, rng, cfg.pretrain_images_per_modality)
    unknown_inits = [i for i in cfg.inits if i not in INITS]
    if unknown_inits:
        raise ValueError(f"unknown initialisation(s) {unknown_inits}; known: {sorted(INITS)}")
    modality_names = sorted(set(modalities))
    pretrained: dict[str, tuple[DEXMaskedAutoEncoder, Path]] = {}
    for kind in dict.fromkeys(INITS[i][0] for i in cfg.inits if INITS[i][0] is not None):
        pretrained[kind] = pretrain(kind, images, cfg, mlflow, tags, out_dir, modalities)

    table: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, dict[str, float]]] = {}
    for name in cfg.tasks:
        task = TASKS[name]
        data = task.loader(root, cfg, np.random.default_rng(cfg.seed))
        table[name], details[name] = {}, {}
        for init in cfg.inits:
            source = INITS[init][0]
            checkpoint = pretrained[source][1] if source is not None else None
            metrics = finetune(task, data, cfg, init, checkpoint, mlflow, tags, modality_names)
            table[name][init] = metrics["score"]
            details[name][init] = metrics

    # modularity: a second draw of images per modality
    probe_images, probe_modalities = draw_images(pools, np.random.default_rng(cfg.seed + 1), cfg.probe_images_per_modality)
    modularity: dict[str, dict] = {}
    files: dict[str, str] = {}
    for init in [*pretrained, "none"]:
        model = pretrained[init][0] if init in pretrained else None
        if init == "m4oe":
            model.encoder.set_m4oe_stage("gated")  # the expert stage would route by the (known) modality
        routes, feats = encoder_routing_and_features(model, probe_images, cfg, dense=init not in ("dex", "dex_umd"))
        if init not in ("dex", "dex_umd"):
            routes = []
        probe = linear_probe_modality_accuracy(feats, probe_modalities, seed=cfg.seed)
        entry = {"probe_modality_accuracy": float(probe.accuracy), "probe_chance": float(probe.chance)}
        if routes:
            nmi = modality_expert_nmi(routes, probe_modalities)
            usage = expert_usage(routes, probe_modalities)
            entry["nmi_per_layer"] = [float(v) for v in nmi]
            heatmap = out_dir / f"modularity_{init}_expert_usage.png"
            plot_modality_expert_heatmaps(usage, heatmap, title=f"{init}: expert use per modality (layers x experts)")
            files["heatmap" if init == "dex" else f"heatmap_{init}"] = str(heatmap)
            entry["usage"] = {m: np.nan_to_num(u).tolist() for m, u in usage.items()}
        modularity[init] = entry

    inits = list(cfg.inits)
    md = [f"# Transfer benchmark {benchmark_id}", "", _markdown_table(table, inits, list(cfg.tasks)), "",
          "## Emergent modularity", "", "| encoder | modality linear-probe accuracy | chance | NMI(modality; expert) per layer |",
          "|---|---|---|---|"]
    for init, entry in modularity.items():
        nmi = ", ".join(f"{v:.3f}" for v in entry.get("nmi_per_layer", [])) or "n/a (no experts)"
        md.append(f"| {init} | {entry['probe_modality_accuracy']:.3f} | {entry['probe_chance']:.3f} | {nmi} |")
    md += ["", f"Pre-training images: {len(modalities)} ({', '.join(f'{m}: {modalities.count(m)}' for m in sorted(set(modalities)))}).",
           f"Wall time: {time.perf_counter() - started:.0f} s."]
    (out_dir / "transfer_table.md").write_text("\n".join(md) + "\n")
    csv_lines = ["task,metric," + ",".join(inits)]
    for task in cfg.tasks:
        metric = "auc" if TASKS[task].kind == "classification" else "dice"
        csv_lines.append(f"{task},{metric}," + ",".join(f"{table[task][i]:.6f}" for i in inits))
    csv_lines.append("mean,," + ",".join(f"{np.nanmean([table[t][i] for t in cfg.tasks]):.6f}" for i in inits))
    (out_dir / "transfer_table.csv").write_text("\n".join(csv_lines) + "\n")
    result = {"benchmark_id": benchmark_id, "table": table, "details": details, "modularity": modularity,
              "config": asdict(cfg), "files": {**files, "markdown": str(out_dir / "transfer_table.md"),
                                                "csv": str(out_dir / "transfer_table.csv")}}
    (out_dir / "transfer_result.json").write_text(json.dumps(result, indent=2, default=float))
    if mlflow:
        with mlflow.start_run(run_name="transfer-summary", tags={**tags, "stage": "summary"}):
            mlflow.log_params({"tasks": ",".join(cfg.tasks), "inits": ",".join(inits)})
            for init in inits:
                mlflow.log_metric(f"mean_score_{init}", float(np.nanmean([table[t][init] for t in cfg.tasks])))
            for init, entry in modularity.items():
                mlflow.log_metric(f"probe_modality_accuracy_{init}", entry["probe_modality_accuracy"])
                for layer, value in enumerate(entry.get("nmi_per_layer", [])):
                    mlflow.log_metric(f"nmi_{init}", value, step=layer)
            for path in result["files"].values():
                mlflow.log_artifact(path)
            mlflow.log_artifact(str(out_dir / "transfer_result.json"))
        result["tracking_uri"] = mlflow.get_tracking_uri()
    return result
