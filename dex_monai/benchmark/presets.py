# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The multi-seed protocol's settings (:class:`ProtocolConfig`, every field a flag of ``scripts/transfer_benchmark.py``)
and its presets: ``cpu`` (the default, sized for 2 CPU cores) and ``gpu`` (the paper's recipe at ViT-B/16, sized as a
smoke run on one large GPU and scaled by flags)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dex_monai.benchmark.config import BenchmarkConfig

__all__ = ["PRESETS", "ProtocolConfig", "preset_values"]


@dataclass
class ProtocolConfig(BenchmarkConfig):
    """:class:`BenchmarkConfig` plus the protocol: seeds, regimes, evaluations, few-label sizes, probe, device.

    ``seed`` is the base seed: it fixes the evaluation splits (identical for every seed) and the first of the
    ``seeds`` consecutive seeds; each seed re-draws the pre-training images and re-runs pre-training, the few-label
    subset, the head initialisation and the sampling order.
    """

    tasks: Sequence[str] = (
        "busi_cls", "pneumonia_cls", "breast_cls", "em_membrane_seg", "hippocampus_seg3d", "adrenal_cls3d",
    )
    experiment: str = "dex-transfer-protocol"
    # CPU sizes (2 cores: 25 min for 3 seeds, measured): fewer steps than the one-seed run, which had 600 / 150
    pretrain_steps: int = 300
    finetune_steps: int = 50
    seeds: int = 3
    regimes: Sequence[str] = ("all", "few")
    evaluations: Sequence[str] = ("finetune", "probe")
    few_per_class: int = 8  # few-label regime, classification: labelled images per class
    few_images: int = 8  # few-label regime, segmentation: labelled images (2D tiles or 3D volumes)
    probe_steps: int = 100
    probe_lr: float = 1e-2
    diagnostic_images_per_modality: int = 60
    device: str = "cpu"
    lambda_bal_decay: bool = False  # cosine-decay lambda_bal from its start value to 0 over pre-training
    base_lr_batch: int = 0  # > 0: learning rates are base rates scaled by batch / base_lr_batch (512 in the paper)

    positive_fields = BenchmarkConfig.positive_fields + ("seeds", "few_per_class", "few_images", "probe_steps")


#: preset name -> field values (flags given on the command line override them)
PRESETS: dict[str, dict] = {
    "cpu": {},
    # The paper's recipe at ViT-B/16 (AdamW; lr = base_lr x batch / 512; warm-up + cosine; lambda_bal 1e-3 decayed
    # to 0 by cosine). Smoke sizes (one seed: 72 cells, 2 pre-trainings), meant for < 8 min on one large GPU -- an
    # estimate, not yet measured; the protocol proper adds --seeds 3 (or more) and longer --pretrain-steps.
    "gpu": {
        "device": "cuda", "img_size": 224, "patch_size": 16, "volume_size": 64, "hidden_size": 768, "mlp_dim": 3072,
        "num_layers": 12, "num_heads": 12, "num_experts": 8, "top_k": 2, "decoder_hidden_size": 512,
        "decoder_num_layers": 8, "pretrain_steps": 200, "pretrain_batch": 256, "pretrain_lr": 1.5e-4,
        "finetune_steps": 30, "finetune_batch": 64, "seg3d_batch": 16, "finetune_lr": 5e-4, "probe_steps": 150,
        "probe_lr": 0.1, "base_lr_batch": 512, "lambda_bal": 1e-3, "lambda_bal_decay": True, "warmup_fraction": 0.1,
        "pretrain_images_per_modality": 2000, "max_train": 2000, "max_eval": 500, "seeds": 1,
    },
}


def preset_values(name: str) -> dict:
    """The field values of preset ``name`` (``cpu`` or ``gpu``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])
