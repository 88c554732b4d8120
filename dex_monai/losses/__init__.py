# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Losses of the related systems: UMD's gradient-guided modality coordination (GM-Coord)."""

from dex_monai.losses.gm_coord import GM_COORD_STATUS, GMCoordLoss, gm_coefficient

__all__ = ["GM_COORD_STATUS", "GMCoordLoss", "gm_coefficient"]
from dex_monai.losses.unimed import CONSISTENCY_FLIP_DIM, UniMedLoss  # noqa: E402

__all__ += ["CONSISTENCY_FLIP_DIM", "UniMedLoss"]
