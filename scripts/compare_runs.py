#!/usr/bin/env python
# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""
Compare MLflow runs of dex_monai (thin wrapper of ``python -m dex_monai.compare``).

Example::

    python scripts/compare_runs.py --experiment dex-pretrain --tracking-uri bundles/dex_pretrain/eval/mlruns.db

See ``docs/compare.md`` and ``python scripts/compare_runs.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dex_monai.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
