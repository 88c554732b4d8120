"""The transfer benchmark's ``m4oe_swin`` initialisation: M4oE on its own architecture, trained on each task.

No pre-training (the benchmark pre-trains ViT MAEs, which do not fit a Swin encoder): on every task the network
starts from scratch, runs the first half of the fine-tuning steps in M4oE's expert stage (each image through its own
modality's expert: the task's modality, or every item's for tasks that mix modalities) and the second half in the
gated stage; it is evaluated in the gated stage. Segmentation tasks use :class:`~dex_monai.networks.M4oESwinUNETR`;
classification tasks use the same Swin encoder with its deepest features averaged over space and a linear layer
(:class:`~dex_monai.networks.M4oESwinClassifier`).
"""

from __future__ import annotations

import torch
from ignite.engine import Engine

from dex_monai.benchmark.tasks import Task, TaskData
from dex_monai.networks.nets.m4oe_swin import M4oESwinClassifier, M4oESwinUNETR

__all__ = ["build_m4oe_swin", "attach_two_stage_schedule"]

#: the benchmark's Swin size: SwinUNETR's default depths and heads, feature size 24, window 7
SWIN = {"feature_size": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "window_size": 7}


def build_m4oe_swin(task: Task, data: TaskData, in_channels: int, size: int) -> torch.nn.Module:
    """The M4oE Swin network for ``task`` with one expert per modality of the task's training set.

    Inputs of ``size`` under 64 leave SwinUNETR's deepest feature map one voxel wide, where instance norm is
    undefined; there the decoder uses batch norm.
    """
    modalities = sorted(set(data.train_modalities)) if data.train_modalities else [task.modality]
    m4oe = {"modalities": modalities, "m4oe_stage": "expert", "default_modality": modalities[0]}
    if data.kind == "segmentation":
        return M4oESwinUNETR(in_channels, data.num_classes, spatial_dims=task.spatial_dims,
                             norm_name="instance" if size >= 64 else "batch", **SWIN, **m4oe)
    return M4oESwinClassifier(in_channels, data.num_classes, spatial_dims=task.spatial_dims, head_dropout=0.1,
                              **SWIN, **m4oe)


def attach_two_stage_schedule(trainer: Engine, model: torch.nn.Module, expert_steps: int) -> None:
    """Expert stage for the first ``expert_steps`` iterations (routing by the batch's ``modality``), then gated."""
    from dex_monai.handlers import M4oEStageHandler

    M4oEStageHandler(model, "modality", expert_iterations=expert_steps).attach(trainer)
