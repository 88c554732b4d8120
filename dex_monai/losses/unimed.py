# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""UniMed's one-stage joint loss: semantic (token) classification, pixel masks, and consistency on unlabelled images."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from dex_monai.networks.blocks.composed_tokens import IGNORE_INDEX, ComposedTargets, ComposedVocabulary

__all__ = ["UniMedLoss", "CONSISTENCY_FLIP_DIM"]

#: the second view of an unlabelled image is the image flipped along its last spatial axis
CONSISTENCY_FLIP_DIM = -1


class UniMedLoss(nn.Module):
    """
    ``semantic_weight * CE(query tokens) + mask_weight * (BCE + Dice)(pixel queries) + consistency_weight * Pi``.

    - semantic: cross-entropy of every query's vocabulary logits against its token target
      (:meth:`ComposedVocabulary.query_targets`: image class token for query 0, pixel class token or ``NO_OBJECT``
      for the pixel queries), over the queries whose image has an annotation of that level;
    - mask: sigmoid binary cross-entropy and soft Dice of the mask logits of the pixel queries whose class is present
      (Mask2Former's mask loss; absent classes are the semantic head's ``NO_OBJECT``);
    - consistency (unlabelled images): the Pi-model loss (Laine and Aila, ICLR 2017): mean squared difference between
      the softmax token probabilities and between the sigmoid masks of an image and of its flipped copy (flipped back),
      gradients through both.

    ``pred`` is the :class:`~dex_monai.networks.UniMed` output for ``B + U`` images; ``target`` is what
    :class:`~dex_monai.engines.PrepareUniMedBatch` returns: ``tokens [B, T]``, ``token_masks [B, T, *S]`` and
    ``view_of [U]`` (the row of the image each extra row is a flipped copy of). The terms of the last call are kept in
    ``self.terms`` (detached floats).
    """

    def __init__(
        self,
        num_image_classes: int,
        num_pixel_classes: int,
        semantic_weight: float = 1.0,
        mask_weight: float = 1.0,
        consistency_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.vocabulary = ComposedVocabulary(num_image_classes, num_pixel_classes)
        self.semantic_weight, self.mask_weight, self.consistency_weight = semantic_weight, mask_weight, consistency_weight
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.terms: dict[str, float] = {}

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        class_logits, mask_logits = pred["class_logits"], pred["mask_logits"]
        tokens = target["tokens"]
        batch = tokens.shape[0]
        class_targets, mask_targets, _ = self.vocabulary.query_targets(ComposedTargets(tokens, target["token_masks"]))
        zero = class_logits.sum() * 0.0
        semantic = zero
        if bool((class_targets != IGNORE_INDEX).any()):
            semantic = F.cross_entropy(class_logits[:batch].flatten(0, 1), class_targets.flatten(), ignore_index=IGNORE_INDEX)
        pixel_targets = class_targets[:, 1:]
        present = (pixel_targets != IGNORE_INDEX) & (pixel_targets != self.vocabulary.NO_OBJECT)  # [B, Cp]
        mask = zero
        if bool(present.any()):
            logits, truth = mask_logits[:batch][present], mask_targets[present]  # [P, *S]
            mask = F.binary_cross_entropy_with_logits(logits, truth) + self.dice(logits[:, None], truth[:, None])
        consistency = zero
        view_of = target.get("view_of")
        if view_of is not None and len(view_of):
            first_cls, second_cls = class_logits[view_of].softmax(-1), class_logits[batch:].softmax(-1)
            first_mask = mask_logits[view_of].sigmoid()
            second_mask = mask_logits[batch:].sigmoid().flip(CONSISTENCY_FLIP_DIM)
            consistency = F.mse_loss(first_cls, second_cls) + F.mse_loss(first_mask, second_mask)
        self.terms = {"semantic": float(semantic.detach()), "mask": float(mask.detach()),
                      "consistency": float(consistency.detach())}
        return self.semantic_weight * semantic + self.mask_weight * mask + self.consistency_weight * consistency
