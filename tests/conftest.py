"""Shared fixtures. Tests that read the real data find it through DEEPLAB_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("DEEPLAB_DATA", _REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $DEEPLAB_DATA). Missing: a failure in CI, a skip elsewhere."""
    root = _data_root()
    if not (root / "camvid_segnet").is_dir():
        msg = f"real data not found at {root}: set DEEPLAB_DATA to the shared/data folder"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def camvid_root(shared_data: Path) -> Path:
    return shared_data / "camvid_segnet"
