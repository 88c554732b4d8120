# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Items of mixed annotation levels (mask, image label, none) made collatable for joint training (UniMed)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["CompleteMaskd", "MISSING_MASK_VALUE"]

#: value of every pixel of the stand-in mask of an image without a mask
MISSING_MASK_VALUE = -1


class CompleteMaskd(MapTransform):
    """
    Give every item a mask ``[1, *spatial]`` as a plain tensor: its own (metadata dropped), or, when the item has
    none, one filled with :data:`MISSING_MASK_VALUE` of the shape of ``d[ref_key]`` (read as "no mask" by
    :meth:`~dex_monai.networks.blocks.ComposedVocabulary.encode`). Place it after the spatial transforms that resize
    the image, before the random ones shared by image and mask.
    """

    def __init__(self, keys: KeysCollection = "mask", ref_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = torch.as_tensor(d[self.ref_key])
        for key in self.keys:
            mask = d.get(key)
            if mask is None:
                d[key] = torch.full((1, *ref.shape[1:]), float(MISSING_MASK_VALUE), dtype=torch.float32)
            else:
                mask = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
                d[key] = mask.to(torch.float32)
        return d
