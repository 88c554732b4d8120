# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The sizes and steps of one transfer-benchmark run (every field is a flag of ``scripts/transfer_benchmark.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["BenchmarkConfig"]


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
    td_calib_steps: int = 50  # TD-Calib: steps of dex_umd pre-training continued on each task's train images
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
    seg3d_batch: int = 4  # 3D segmentation fine-tuning batch: UNETR's 3D decoder dominates a CPU run's time
    finetune_lr: float = 3e-4
    warmup_fraction: float = 0.1
    max_train: int = 400
    max_eval: int = 200
    probe_images_per_modality: int = 60
    seed: int = 0
    threads: int = 0
    extra_pretrain_options: dict = field(default_factory=dict)

    #: fields that must be at least 1 (sizes, steps, batches): a zero fails late, after minutes of pre-training
    positive_fields: ClassVar[tuple[str, ...]] = (
        "img_size", "volume_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "num_experts",
        "top_k", "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch", "seg3d_batch", "max_train",
        "max_eval",
    )

    def __post_init__(self) -> None:
        for name, value in self.non_positive(vars(self)):
            raise ValueError(f"{name} must be at least 1, got {value}")

    @classmethod
    def non_positive(cls, values: dict) -> list[tuple[str, object]]:
        """``(field, value)`` of every field of ``positive_fields`` in ``values`` that is below 1."""
        return [(name, values[name]) for name in cls.positive_fields if name in values and values[name] < 1]
