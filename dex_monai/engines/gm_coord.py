# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Where GM-Coord used to live, kept for older configs: the loss is :mod:`dex_monai.losses.gm_coord`, the handler
:mod:`dex_monai.handlers.gm_coord`."""

from dex_monai.handlers.gm_coord import GMCoordHandler  # noqa: F401
from dex_monai.losses.gm_coord import GM_COORD_STATUS, GMCoordLoss, gm_coefficient  # noqa: F401
