from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Folder of real images: ``$DEX_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("DEX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real images; required when the folder exists, skipped with a clear message where it does not."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real-image tests skipped: shared data folder {root} does not exist (set DEX_SHARED_DATA)")
    return root


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    torch.manual_seed(0)
    yield
