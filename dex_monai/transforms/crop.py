"""Random resized crop that rejects near-black crops, as the DEX MedVerse loader does."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep

__all__ = ["RandResizedCrop", "RandResizedCropd"]


class RandResizedCrop(RandomizableTransform):
    """Crop a random box of random area and aspect ratio, resize it to ``size``; skip near-black boxes.

    Behaviour (after the DEX reference loader):

    - the box area is drawn uniformly in ``scale`` x image area, with the lower bound raised so that the
      box is at least ``min_output_area_fraction`` of the output area (no extreme up-sampling);
    - the aspect ratio (width / height) is drawn log-uniformly in ``ratio``;
    - up to ``max_attempts`` boxes are drawn; a box that does not fit, or whose mean intensity is below
      ``min_mean`` (near-black: background, air), is rejected and another is drawn;
    - if none is accepted, the central square of side ``min(H, W)`` is used.

    The image must be channel-first ``[C, S0, S1]`` with intensities in ``[0, 1]`` (normalise first).
    Returns a ``float32`` ``torch.Tensor`` ``[C, size[0], size[1]]`` (metadata are not kept).
    Down-sizing uses area interpolation, up-sizing bilinear.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        min_mean: float = 0.05,
        max_attempts: int = 10,
        min_output_area_fraction: float = 0.5,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.size = tuple(int(s) for s in ensure_tuple_rep(size, 2))
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}.")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.min_mean = float(min_mean)
        self.max_attempts = int(max_attempts)
        self.min_output_area_fraction = float(min_output_area_fraction)
        self.last_box: tuple[int, int, int, int] | None = None  # (start0, start1, len0, len1) of the last call

    def _boxes(self, s0: int, s1: int):
        area = s0 * s1
        low = max(self.size[0] * self.size[1] * self.min_output_area_fraction, area * self.scale[0]) / area
        high = self.scale[1]
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.max_attempts):
            target = self.R.uniform(min(low, high), max(low, high)) * area
            aspect = math.exp(self.R.uniform(*log_r))
            len0 = int(round(math.sqrt(target * aspect)))  # width-like axis
            len1 = int(round(math.sqrt(target / aspect)))
            if 0 < len0 <= s0 and 0 < len1 <= s1:
                start0 = int(self.R.randint(0, s0 - len0 + 1))
                start1 = int(self.R.randint(0, s1 - len1 + 1))
                yield start0, start1, len0, len1

    def _resize(self, crop: torch.Tensor) -> torch.Tensor:
        if tuple(crop.shape[1:]) == self.size:
            return crop
        down = crop.shape[1] >= self.size[0] and crop.shape[2] >= self.size[1]
        if down:
            return F.interpolate(crop[None], size=self.size, mode="area")[0]
        return F.interpolate(crop[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        x = torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img, dtype=torch.float32)
        if x.ndim != 3:
            raise ValueError(f"RandResizedCrop: expected a channel-first 2-D image [C, S0, S1], got {tuple(x.shape)}.")
        s0, s1 = int(x.shape[1]), int(x.shape[2])
        box = None
        for start0, start1, len0, len1 in self._boxes(s0, s1):
            crop = x[:, start0 : start0 + len0, start1 : start1 + len1]
            if float(crop.mean()) < self.min_mean:
                continue  # near-black: try another box
            box = (start0, start1, len0, len1)
            break
        if box is None:  # fallback: central square
            side = min(s0, s1)
            box = ((s0 - side) // 2, (s1 - side) // 2, side, side)
        self.last_box = box
        start0, start1, len0, len1 = box
        return self._resize(x[:, start0 : start0 + len0, start1 : start1 + len1].contiguous())


class RandResizedCropd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandResizedCrop` (the same box for all ``keys``)."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        size: int | Sequence[int] = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        min_mean: float = 0.05,
        max_attempts: int = 10,
        min_output_area_fraction: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.cropper = RandResizedCrop(size, scale, ratio, min_mean, max_attempts, min_output_area_fraction)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandResizedCropd:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        d[keys[0]] = self.cropper(d[keys[0]])
        box = self.cropper.last_box
        for key in keys[1:]:  # same box for the other keys
            x = torch.as_tensor(d[key], dtype=torch.float32)
            assert box is not None
            d[key] = self.cropper._resize(x[:, box[0] : box[0] + box[2], box[1] : box[1] + box[3]].contiguous())
        return d
