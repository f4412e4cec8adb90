"""Shared fixtures: where the real test data lives, and small helpers to build tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch_threads = os.environ.setdefault("ARKFED_TEST_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ARKFED_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real label files, MedMNIST, lung masks, sample images); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ARKFED_SHARED_DATA or check out ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def label_files(shared_data: Path) -> Path:
    return shared_data / "label-files"
