# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""An inferer wrapper that keeps ``MetaTensor`` metadata away from the network and gives it back to the output."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

__all__ = ["TensorInferer"]


class TensorInferer(Inferer):
    """
    Run a MONAI inferer on the plain tensor of a ``MetaTensor`` input and give the output the input's metadata back
    (what MONAI inferers return for ``MetaTensor`` inputs), so ``Invertd``, writers and overlays work as usual while
    the network never sees metadata (see :func:`prepare_tensor_batch`). Use it around the validation / inference
    inferer, e.g. ``{"_target_": "dex_monai.inferers.TensorInferer", "inferer": {"_target_":
    "SlidingWindowInferer", ...}}``.
    """

    def __init__(self, inferer: Inferer | None = None) -> None:
        from monai.inferers import SimpleInferer

        self.inferer = inferer if inferer is not None else SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, MetaTensor):
            return self.inferer(inputs, network, *args, **kwargs)
        outputs = self.inferer(inputs.as_tensor(), network, *args, **kwargs)
        if isinstance(outputs, torch.Tensor) and not isinstance(outputs, MetaTensor):
            outputs = convert_to_dst_type(outputs, inputs, dtype=outputs.dtype, device=outputs.device)[0]
        return outputs

    def __getattr__(self, name: str) -> Any:  # roi_size, sw_batch_size ... of the wrapped inferer
        if name == "inferer":
            raise AttributeError(name)
        return getattr(self.inferer, name)
