# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""UniMed batches: annotations of mixed levels (masks, image labels, none) to the composed token format, plus the
flipped second view of every unlabelled image for the consistency loss."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor

from dex_monai.losses.unimed import CONSISTENCY_FLIP_DIM
from dex_monai.networks.blocks.composed_tokens import ComposedVocabulary

__all__ = ["PrepareUniMedBatch", "UNIMED_LABEL_KINDS"]

UNIMED_LABEL_KINDS = ("mixed", "segmentation", "classification")


class PrepareUniMedBatch:
    """
    ``prepare_batch`` of MONAI trainers for :class:`~dex_monai.networks.UniMed`: returns ``(images [B + U, C, *S],
    targets)`` with ``targets = {"tokens", "token_masks", "view_of"}`` for :class:`~dex_monai.losses.UniMedLoss`.

    Args:
        num_image_classes, num_pixel_classes: the vocabulary (:class:`ComposedVocabulary`).
        label_kind: ``"mixed"``: the batch has ``mask_key`` (``[B, 1, *S]``, ``-1`` everywhere for images without a
            mask, see :class:`~dex_monai.transforms.CompleteMaskd`) and ``class_key`` (``[B]``, ``-1`` for none);
            ``"segmentation"`` / ``"classification"``: ``label_key`` is a mask / a class index for every image.
        consistency_views: append a flipped copy of every image with neither annotation (``U`` rows).
    """

    def __init__(
        self,
        num_image_classes: int,
        num_pixel_classes: int,
        label_kind: str = "mixed",
        consistency_views: bool = True,
        image_key: str = "image",
        mask_key: str = "mask",
        class_key: str = "class_label",
        label_key: str = "label",
    ) -> None:
        if label_kind not in UNIMED_LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {UNIMED_LABEL_KINDS}, got {label_kind!r}.")
        self.vocabulary = ComposedVocabulary(num_image_classes, num_pixel_classes)
        self.label_kind, self.consistency_views = label_kind, consistency_views
        self.image_key, self.mask_key, self.class_key, self.label_key = image_key, mask_key, class_key, label_key

    def annotations(self, batch: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels [B], masks [B, 1, *S])`` with ``-1`` for missing annotations."""
        size = images.shape[0]
        no_mask = torch.full((size, 1, *images.shape[2:]), -1, dtype=torch.long, device=images.device)
        if self.label_kind == "segmentation":
            masks = torch.as_tensor(batch[self.label_key]).to(images.device).round().long()
            return torch.full((size,), -1, dtype=torch.long, device=images.device), masks
        if self.label_kind == "classification":
            return torch.as_tensor(batch[self.label_key]).to(images.device).reshape(-1).long(), no_mask
        masks = torch.as_tensor(batch[self.mask_key]).to(images.device).round().long()
        return torch.as_tensor(batch[self.class_key]).to(images.device).reshape(-1).long(), masks

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key]
        images = (images.as_tensor() if isinstance(images, MetaTensor) else torch.as_tensor(images)).to(
            device, non_blocking=non_blocking
        )
        labels, masks = self.annotations(batchdata, images)
        targets = self.vocabulary.encode(labels, masks)
        unlabelled = ((labels < 0) & (masks < 0).flatten(1).all(1)).nonzero().flatten()
        if not self.consistency_views:
            unlabelled = unlabelled[:0]
        if len(unlabelled):
            images = torch.cat([images, images[unlabelled].flip(CONSISTENCY_FLIP_DIM)])
        return images, {"tokens": targets.tokens, "token_masks": targets.token_masks, "view_of": unlabelled}
