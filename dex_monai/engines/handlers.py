# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Where the DEX training handlers used to live, kept so that older configs and imports resolve. Each topic has its
own module in :mod:`dex_monai.handlers`: ``tracking`` (MLflow and the tracking queue), ``schedules``, ``progress``
and ``routing``."""

from dex_monai.handlers import *  # noqa: F401,F403
from dex_monai.handlers import __all__  # noqa: F401
