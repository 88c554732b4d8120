# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Inferers of the DEX bundles."""

from dex_monai.inferers.tensor_inferer import TensorInferer

__all__ = ["TensorInferer"]
