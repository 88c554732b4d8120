# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""The one patch-embedding kernel adapter, used by every loader (:func:`dex_monai.networks.load_encoder_weights`,
hence the fine-tuning bundles, the README example and the transfer benchmark).

A checkpoint's patch kernel ``[D, C_s, *k_s]`` is fitted to a network's ``[D, C_t, *k_t]``:

- **channels**: summed over the source channels and shared equally by the target channels, so an image whose channels
  are all equal (a grey image given as RGB, or as one channel) embeds exactly as before;
- **2D -> 3D**: repeated along the *slicing axis* and divided by its length, so a volume constant along that axis
  embeds like its 2D slice. Pre-training cuts volumes into slices along the last spatial axis
  (:class:`dex_monai.transforms.ExtractSlice` ``axis=2``), so that is the default; **3D -> 2D** sums over it;
- **kernel size** (another patch size): resampled (bicubic in 2D as the DEX reference code does, trilinear in 3D),
  then each kernel's sum is restored (the difference spread evenly), so that a constant image embeds the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SLICE_AXIS", "adapt_patch_kernel"]

#: spatial axis (0-based, of ``[X, Y, Z]``) along which pre-training slices volumes
SLICE_AXIS = 2


def adapt_patch_kernel(
    weight: torch.Tensor, target_shape: Sequence[int], slice_axis: int = SLICE_AXIS
) -> tuple[torch.Tensor, list[str]]:
    """
    ``weight [D, C_s, *k_s]`` fitted to ``target_shape [D, C_t, *k_t]`` (see the module docstring).

    Args:
        weight: the checkpoint's patch-embedding kernel.
        target_shape: the network's kernel shape.
        slice_axis: spatial axis of the 3D kernel that corresponds to the slices the 2D kernel saw.

    Returns:
        the adapted kernel (the source dtype) and a note per step taken.

    Raises:
        ValueError: the token dimension ``D`` differs, or the dimensionalities cannot be related.
    """
    target_shape = tuple(int(s) for s in target_shape)
    notes: list[str] = []
    w = weight.detach().float()
    if w.shape[0] != target_shape[0]:
        raise ValueError(f"token dimension differs: checkpoint {tuple(w.shape)} vs network {target_shape}.")
    if w.shape[1] != target_shape[1]:
        w = w.sum(dim=1, keepdim=True).repeat(1, target_shape[1], *([1] * (w.dim() - 2))) / target_shape[1]
        notes.append(f"input channels {weight.shape[1]} -> {target_shape[1]} (kernel summed and shared)")
    src_dims, tgt_dims = w.dim() - 2, len(target_shape) - 2
    if src_dims == 2 and tgt_dims == 3:
        depth = target_shape[2 + slice_axis]
        w = w.unsqueeze(2 + slice_axis)
        w = w.repeat(*[depth if d == 2 + slice_axis else 1 for d in range(w.dim())]) / depth
        notes.append(f"2D kernel inflated to 3D along spatial axis {slice_axis} (the slicing axis), depth {depth}")
    elif src_dims == 3 and tgt_dims == 2:
        w = w.sum(dim=2 + slice_axis)
        notes.append(f"3D kernel summed over spatial axis {slice_axis} (the slicing axis) to 2D")
    elif src_dims != tgt_dims:
        raise ValueError(f"cannot adapt a {src_dims}D patch embedding to {tgt_dims}D.")
    if tuple(w.shape[2:]) != target_shape[2:]:
        before = float(np.prod(w.shape[2:]))
        mode = "bicubic" if tgt_dims == 2 else "trilinear"
        sums = w.sum(dim=tuple(range(2, w.dim())), keepdim=True)
        w = F.interpolate(w, size=target_shape[2:], mode=mode, align_corners=False)
        w = w * before / float(np.prod(target_shape[2:]))
        # interpolation does not keep a kernel's sum: spread the difference evenly so that it does
        w = w + (sums - w.sum(dim=tuple(range(2, w.dim())), keepdim=True)) / float(np.prod(target_shape[2:]))
        notes.append(f"kernel resampled {tuple(weight.shape[2:])} -> {target_shape[2:]} ({mode})")
    return w.to(weight.dtype), notes
