# Copyright (c) the dex_monai contributors.
# Licensed under the Apache License, Version 2.0.
"""Building blocks of the DEX MONAI Label app (label_app/main.py)."""
