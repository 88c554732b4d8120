"""UniMed's composed token format: image labels and pixel masks of every image as one discrete token sequence.

One vocabulary holds the task tokens, a "no object" token, one token per image class and one token per pixel class.
An image's annotations become a sequence (task token, then its class tokens) padded to a fixed length; every pixel-class
token carries the binary mask of its class (the mask-query assignment: pixel class ``c`` is predicted by query
``1 + c``). Images without any annotation have an all-padding sequence. The same vocabulary is the decoder's output
space: the semantic head of every query predicts one of its tokens (see :class:`~dex_monai.networks.nets.UniMed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ComposedTargets", "ComposedVocabulary", "IGNORE_INDEX"]

#: class target of a query whose image has no annotation of the query's level (ignored by the losses)
IGNORE_INDEX = -100


@dataclass
class ComposedTargets:
    """A batch in the composed token format.

    Attributes:
        tokens: ``[B, T]`` token ids (``ComposedVocabulary.PAD`` after the last token).
        token_masks: ``[B, T, *spatial]`` bool, the pixel mask of each pixel-class token (all False otherwise).
    """

    tokens: torch.Tensor
    token_masks: torch.Tensor

    def to(self, device: torch.device | str) -> ComposedTargets:
        return ComposedTargets(self.tokens.to(device), self.token_masks.to(device))


class ComposedVocabulary:
    """Token ids of the composed format for ``num_image_classes`` image classes and ``num_pixel_classes`` pixel
    classes (background included, as a segmentation network's ``out_channels``).

    Layout: ``PAD=0, TASK_CLASSIFY=1, TASK_SEGMENT=2, NO_OBJECT=3``, then the image classes, then the pixel classes.
    An image's sequence is ``[TASK_CLASSIFY, image class]`` when it has an image label, followed by
    ``[TASK_SEGMENT, pixel classes present, ascending]`` when it has a mask; its length is at most
    ``max_length = 3 + num_pixel_classes``.

    Queries: query 0 reads image labels (role ``TASK_CLASSIFY``); query ``1 + c`` is assigned pixel class ``c``
    (role ``TASK_SEGMENT``); ``num_queries = 1 + num_pixel_classes``.
    """

    PAD, TASK_CLASSIFY, TASK_SEGMENT, NO_OBJECT = 0, 1, 2, 3
    SPECIAL = 4

    def __init__(self, num_image_classes: int, num_pixel_classes: int) -> None:
        if num_image_classes < 1 or num_pixel_classes < 2:
            raise ValueError(
                f"need at least 1 image class and 2 pixel classes (background included), got {num_image_classes} "
                f"and {num_pixel_classes}."
            )
        self.num_image_classes = int(num_image_classes)
        self.num_pixel_classes = int(num_pixel_classes)
        self.size = self.SPECIAL + self.num_image_classes + self.num_pixel_classes
        self.max_length = 3 + self.num_pixel_classes
        self.num_queries = 1 + self.num_pixel_classes

    # ------------------------------------------------------------------ ids
    def image_token(self, index: int | torch.Tensor) -> int | torch.Tensor:
        return self.SPECIAL + index

    def pixel_token(self, index: int | torch.Tensor) -> int | torch.Tensor:
        return self.SPECIAL + self.num_image_classes + index

    @property
    def image_token_ids(self) -> slice:
        """Slice of the vocabulary holding the image classes."""
        return slice(self.SPECIAL, self.SPECIAL + self.num_image_classes)

    @property
    def pixel_token_ids(self) -> slice:
        """Slice of the vocabulary holding the pixel classes."""
        return slice(self.SPECIAL + self.num_image_classes, self.size)

    def query_roles(self) -> torch.Tensor:
        """``[Q]`` the task token of each query (the decoder adds its embedding to the learned query)."""
        roles = torch.full((self.num_queries,), self.TASK_SEGMENT, dtype=torch.long)
        roles[0] = self.TASK_CLASSIFY
        return roles

    # ------------------------------------------------------------------ encode / decode
    def encode(self, labels: torch.Tensor, masks: torch.Tensor) -> ComposedTargets:
        """Annotations -> tokens.

        Args:
            labels: ``[B]`` image class indices, ``-1`` for images without an image label.
            masks: ``[B, 1, *spatial]`` pixel class indices, ``-1`` everywhere for images without a mask (a mask is
                either complete or absent).

        Returns:
            :class:`ComposedTargets` with ``T = max_length``.
        """
        labels = torch.as_tensor(labels).long().reshape(-1)
        masks = torch.as_tensor(masks).long()
        batch, spatial = masks.shape[0], tuple(masks.shape[2:])
        if masks.shape[1] != 1 or batch != labels.shape[0]:
            raise ValueError(f"labels [B] and masks [B, 1, *spatial] expected, got {list(labels.shape)}, {list(masks.shape)}.")
        if labels.numel() and (int(labels.max()) >= self.num_image_classes or int(labels.min()) < -1):
            raise ValueError(f"image labels must lie in [-1, {self.num_image_classes - 1}], got {labels.tolist()}.")
        tokens = torch.full((batch, self.max_length), self.PAD, dtype=torch.long, device=masks.device)
        token_masks = torch.zeros((batch, self.max_length, *spatial), dtype=torch.bool, device=masks.device)
        for b in range(batch):
            position = 0
            if labels[b] >= 0:
                tokens[b, :2] = torch.tensor([self.TASK_CLASSIFY, self.image_token(int(labels[b]))])
                position = 2
            mask = masks[b, 0]
            has_mask = bool((mask >= 0).all())
            if not has_mask and bool((mask >= 0).any()):
                raise ValueError(f"image {b}: a mask must be complete (all pixels >= 0) or absent (all -1).")
            if has_mask:
                if int(mask.max()) >= self.num_pixel_classes:
                    raise ValueError(f"image {b}: mask values must lie below {self.num_pixel_classes}.")
                tokens[b, position] = self.TASK_SEGMENT
                position += 1
                for c in torch.unique(mask).tolist():
                    tokens[b, position] = self.pixel_token(int(c))
                    token_masks[b, position] = mask == c
                    position += 1
        return ComposedTargets(tokens, token_masks)

    def decode(self, targets: ComposedTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> annotations: the inverse of :meth:`encode`, ``(labels [B], masks [B, 1, *spatial])`` with ``-1``
        where an image has no image label / no mask."""
        tokens, token_masks = targets.tokens, targets.token_masks
        batch, spatial = tokens.shape[0], tuple(token_masks.shape[2:])
        labels = torch.full((batch,), -1, dtype=torch.long, device=tokens.device)
        masks = torch.full((batch, 1, *spatial), -1, dtype=torch.long, device=tokens.device)
        image_ids, pixel_ids = self.image_token_ids, self.pixel_token_ids
        for b in range(batch):
            for t, token in enumerate(tokens[b].tolist()):
                if image_ids.start <= token < image_ids.stop:
                    labels[b] = token - image_ids.start
                elif pixel_ids.start <= token < pixel_ids.stop:
                    masks[b, 0][token_masks[b, t]] = token - pixel_ids.start
        return labels, masks

    def query_targets(self, targets: ComposedTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training targets of the queries, read from the tokens.

        Returns:
            ``class_targets [B, Q]``: token id each query must predict (query 0: the image class token; query
            ``1 + c``: pixel class ``c``'s token when present, ``NO_OBJECT`` when the mask lacks it;
            ``IGNORE_INDEX`` where the image has no annotation of that level), ``mask_targets [B, Q - 1, *spatial]``
            float (the pixel queries' masks) and ``has_mask [B]`` bool.
        """
        tokens, token_masks = targets.tokens, targets.token_masks
        batch, spatial = tokens.shape[0], tuple(token_masks.shape[2:])
        image_ids, pixel_ids = self.image_token_ids, self.pixel_token_ids
        is_image = (tokens >= image_ids.start) & (tokens < image_ids.stop)
        is_pixel = (tokens >= pixel_ids.start) & (tokens < pixel_ids.stop)
        has_label = is_image.any(1)
        has_mask = (tokens == self.TASK_SEGMENT).any(1)
        class_targets = torch.full((batch, self.num_queries), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
        class_targets[has_label, 0] = (tokens * is_image).sum(1)[has_label]
        class_targets[has_mask, 1:] = self.NO_OBJECT
        # pixel class of every token (0 for non-pixel tokens, masked out below), scattered to its query
        pixel_class = torch.where(is_pixel, tokens - pixel_ids.start, torch.zeros_like(tokens))
        onehot = torch.nn.functional.one_hot(pixel_class, self.num_pixel_classes) * is_pixel[..., None]  # [B, T, Cp]
        present = onehot.sum(1) > 0  # [B, Cp]
        pixel_targets = class_targets[:, 1:]
        pixel_targets[present] = self.pixel_token(torch.arange(self.num_pixel_classes, device=tokens.device)).expand(
            batch, -1
        )[present]
        mask_targets = torch.einsum("btc,bt...->bc...", onehot.float(), token_masks.float())
        return class_targets, mask_targets.reshape(batch, self.num_pixel_classes, *spatial), has_mask
