# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Frozen-encoder probe of the transfer benchmark: the downstream network of an initialisation is built and loaded as
for fine-tuning (:func:`~dex_monai.benchmark.transfer._build_downstream`, :func:`~dex_monai.networks.load_encoder_weights`,
3D kernels inflated along the slicing axis), its encoder is frozen and run once over the images, and a light head is
trained on the features with MONAI's ``SupervisedTrainer`` (the same engine fine-tuning uses):

* classification: batch norm without affine + linear layer on the mean of the final patch tokens (MAE's linear probe);
* segmentation: batch norm + 1x1 convolution on the patch-token grid, upsampled to the image size.

The probe measures the representation itself; it is cheap because the encoder runs once per image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dex_monai.benchmark.config import BenchmarkConfig
from dex_monai.benchmark.tasks import Task, TaskData
from dex_monai.networks import load_encoder_weights

__all__ = ["LinearProbeHead", "TokenSegmentationHead", "encoder_features", "probe"]


class LinearProbeHead(nn.Sequential):
    """``[B, D] -> [B, num_classes]``: batch norm (no affine) then a linear layer."""

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(hidden_size, affine=False), nn.Linear(hidden_size, num_classes))


class TokenSegmentationHead(nn.Module):
    """``[B, D, *grid] -> [B, num_classes, *image_size]``: batch norm, 1x1 convolution, (tri)linear upsampling."""

    def __init__(self, hidden_size: int, num_classes: int, image_size: Sequence[int], spatial_dims: int) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.norm, self.conv = norm(hidden_size), conv(hidden_size, num_classes, kernel_size=1)
        self.image_size = tuple(image_size)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(self.norm(x)), size=self.image_size, mode=self.mode, align_corners=False)


def _encoder(model: nn.Module) -> nn.Module:
    """The :class:`~dex_monai.networks.DEXViT` of a ``DEXUNETR`` (``vit``) or ``DEXClassifier`` (``encoder``)."""
    return model.vit if hasattr(model, "vit") else model.encoder


def encoder_features(encoder: nn.Module, images: torch.Tensor, kind: str, batch: int, device: str = "cpu") -> torch.Tensor:
    """Frozen features of ``images`` ``[N, C, *S]``: ``[N, D]`` (mean of the final patch tokens) for classification,
    ``[N, D, *grid]`` (the final patch tokens on their grid) for segmentation."""
    encoder.eval()
    grid = tuple(encoder.grid_size)
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            tokens, _ = encoder(images[i : i + batch].to(device))
            patches = tokens[:, 1:].float()
            if kind == "classification":
                out.append(patches.mean(1).cpu())
            else:
                out.append(patches.reshape(patches.shape[0], *grid, -1).movedim(-1, 1).contiguous().cpu())
    return torch.cat(out)


def probe(
    task: Task, data: TaskData, cfg: BenchmarkConfig, init: str, checkpoint: Path | None, mlflow, tags: dict,
    modality_names: Sequence[str] = (), run_name: str | None = None,
) -> dict[str, float]:
    """Train a head on the frozen encoder of ``init`` (random weights when ``checkpoint`` is None) with
    ``SupervisedTrainer`` (AdamW ``cfg.probe_lr``, warm-up + cosine, ``cfg.probe_steps`` steps) and return the
    held-out metrics of :func:`~dex_monai.benchmark.transfer._evaluate` (``score`` = AUC or Dice)."""
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    from dex_monai.benchmark.transfer import _build_downstream, _evaluate, _finish_mlflow, _loader, _mlflow_handler, _schedule

    device = getattr(cfg, "device", "cpu")
    torch.manual_seed(cfg.seed)
    model = _build_downstream(task, data, cfg, init, modality_names)
    if checkpoint is not None:
        load_encoder_weights(model, checkpoint, strict=True)
    encoder = _encoder(model).to(device)
    start = time.perf_counter()
    batch = max(cfg.finetune_batch, 16)
    train_f = encoder_features(encoder, data.train_x, data.kind, batch, device)
    eval_f = encoder_features(encoder, data.eval_x, data.kind, batch, device)
    hidden = train_f.shape[1]
    if data.kind == "classification":
        head: nn.Module = LinearProbeHead(hidden, data.num_classes)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        head = TokenSegmentationHead(hidden, data.num_classes, data.train_y.shape[2:], task.spatial_dims)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    head = head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=0.0)
    items = [{"image": train_f[i], "label": data.train_y[i]} for i in range(len(train_f))]
    name = run_name or f"{task.name}-{init}-probe"
    tracking = _mlflow_handler(
        cfg, mlflow, name, {**tags, "stage": "probe", "init": init, "task": task.name},
        {"task": task.name, "init": init, "modality": task.modality, "kind": data.kind, "probe_steps": cfg.probe_steps,
         "probe_lr": cfg.probe_lr, "train_size": len(train_f), "eval_size": len(eval_f)},
        output_transform=lambda out: {"train_loss": float(out["loss"].detach())},
    )
    handlers = [_schedule(optimizer, cfg, cfg.probe_steps)] + ([tracking] if tracking else [])
    trainer = SupervisedTrainer(
        device=device, max_epochs=1, train_data_loader=_loader(items, None, cfg, cfg.probe_steps, cfg.finetune_batch),
        network=head, optimizer=optimizer, loss_function=loss_fn, train_handlers=handlers, decollate=False,
    )
    trainer.run()
    features = TaskData(train_f, data.train_y, eval_f, data.eval_y, data.num_classes, data.spatial_dims, data.kind,
                        data.modality)
    metrics = _evaluate(head.cpu(), features, cfg.finetune_batch)
    metrics["train_seconds"] = time.perf_counter() - start
    _finish_mlflow(tracking, metrics)
    return metrics
