# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Prediction overlays: the first images of a run with ground truth and prediction, as a PNG for MLflow."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.utils import IgniteInfo, min_version, optional_import

from dex_monai.handlers.tracking import add_tracking_artifact
from dex_monai.engines.utils import is_rank0
from dex_monai.handlers.utils import output_items

__all__ = ["PredictionOverlayHandler", "draw_overlays"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")


def _index_map(x: torch.Tensor | None) -> np.ndarray | None:
    """``[C, *spatial]`` one-hot / probabilities or ``[1, *spatial]`` indices -> ``[*spatial]`` class indices."""
    if x is None:
        return None
    x = torch.as_tensor(x).detach().float().cpu()
    return (x.argmax(0) if x.shape[0] > 1 else x[0]).numpy()


def _resize_nearest(index_map: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
    """``index_map`` on a grid of ``shape``: reshaped when only singleton axes differ, else nearest-resampled."""
    spatial = tuple(int(s) for s in shape)
    if tuple(index_map.shape) == spatial:
        return index_map
    if index_map.size == int(np.prod(spatial)):
        return index_map.reshape(spatial)
    if index_map.ndim != len(spatial):
        return None
    x = torch.as_tensor(np.asarray(index_map, dtype=np.float32))
    return F.interpolate(x[None, None], size=spatial, mode="nearest")[0, 0].numpy()


class PredictionOverlayHandler:
    """
    Draw the first validation images of every run with the ground truth and the prediction as a PNG
    (``<output_dir>/overlays/<prefix>_epoch_<N>.png``; the axial slice with the most foreground for volumes) and queue
    it as an MLflow artifact (:func:`~dex_monai.engines.add_tracking_artifact`, uploaded by
    :class:`~dex_monai.engines.DEXMLFlowHandler` at the end of the epoch; attach this handler before it).

    Args:
        output_dir: root of the overlays folder.
        max_images: images drawn per run.
        prefix: file name prefix.
        artifact_dir: MLflow artifact folder.
        epoch_fn: callable giving the epoch to name the file with (default: the engine's epoch).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        max_images: int = 2,
        prefix: str = "val",
        artifact_dir: str = "overlays",
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
        epoch_fn: Any = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_images = int(max_images)
        self.prefix = prefix
        self.artifact_dir = artifact_dir
        self.keys = (image_key, label_key, pred_key)
        self.epoch_fn = epoch_fn
        self.enabled = enabled
        self.samples: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]] = []
        self.last_path: Path | None = None
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.samples = []

    def iteration_completed(self, engine: Engine) -> None:
        if len(self.samples) >= self.max_images or not is_rank0():
            return
        image_key, label_key, pred_key = self.keys
        for item in output_items(engine.state.output):
            if len(self.samples) >= self.max_images:
                break
            image = item.get(image_key)
            if image is None or item.get(pred_key) is None:
                continue
            name = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
            image = torch.as_tensor(image).detach().float().cpu()
            maps = [_index_map(item.get(k)) for k in (label_key, pred_key)]
            # predictions inverted to the input's geometry no longer match the preprocessed image: resample for display
            maps = [None if m is None else _resize_nearest(m, image.shape[1:]) for m in maps]
            self.samples.append((image.numpy(), maps[0], maps[1], str(name)))

    def epoch_completed(self, engine: Engine) -> None:
        if not self.samples or not is_rank0():
            return
        epoch = int(self.epoch_fn() if callable(self.epoch_fn) else engine.state.epoch)
        path = self.output_dir / "overlays" / f"{self.prefix}_epoch_{epoch}.png"
        try:
            draw_overlays(self.samples, path, title=f"{self.prefix}, epoch {epoch}")
        except Exception as e:  # drawing must never stop training
            self.logger.warning(f"could not draw prediction overlays: {e}")
            return
        self.last_path = path
        add_tracking_artifact(engine, path, self.artifact_dir)


def _display_slice(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None):
    """2D views ``(image [H, W] or [H, W, 3], label, pred)``; volumes cut at the slice with most foreground."""
    spatial = image.shape[1:]
    if len(spatial) == 3:
        ref = label if label is not None and label.any() else pred
        z = int(np.argmax((ref > 0).reshape(-1, spatial[-1]).sum(0))) if ref is not None and ref.any() else spatial[-1] // 2
        image, label = image[..., z], None if label is None else label[..., z]
        pred = None if pred is None else pred[..., z]
    channels = image if image.shape[0] == 3 else image.mean(0, keepdims=True)
    scaled = []
    for channel in channels:  # per channel: standardised grey-as-RGB images show grey, not tinted
        lo, hi = float(np.percentile(channel, 1)), float(np.percentile(channel, 99))
        scaled.append(np.clip((channel - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(channel))
    view = np.stack(scaled, -1) if len(scaled) == 3 else scaled[0]
    # array axes (x, y) of MONAI-loaded images are shown transposed so that rows are y
    tr = (lambda a: None if a is None else np.swapaxes(a, 0, 1))
    return tr(view), tr(label), tr(pred)


def draw_overlays(
    samples: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """One row per sample: image, ground truth over the image (only when some sample has one, e.g. not at inference),
    prediction over the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(samples)
    with_truth = any(label is not None for _, label, _, _ in samples)
    cols = 3 if with_truth else 2
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    for r, (image, label, pred, name) in enumerate(samples):
        origin = "lower" if image.ndim == 4 else "upper"  # RAS volumes: anterior up; pictures: first row on top
        view, label, pred = _display_slice(image, label, pred)
        top = max(1, int(max(np.max(label) if label is not None else 0, np.max(pred) if pred is not None else 0)))
        panels = ((None, "image"), (label, "ground truth"), (pred, "prediction"))
        for c, (overlay, what) in enumerate(p for p in panels if with_truth or p[1] != "ground truth"):
            ax = fig.add_subplot(rows, cols, cols * r + c + 1)
            ax.imshow(view, cmap=None if view.ndim == 3 else "gray", origin=origin)
            if overlay is not None:
                masked = np.ma.masked_where(overlay == 0, overlay)
                ax.imshow(masked, cmap="autumn", alpha=0.5, vmin=0, vmax=top, origin=origin)
            ax.set_title(what if c else (os.path.basename(name) or "image"), fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=80)
    return path
