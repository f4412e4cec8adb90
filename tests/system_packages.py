"""System programs some tests drive (nginx, chromium): ``make test`` installs them with apt-get
when it runs as root (what CI does). A test that needs one skips, saying why, only where it cannot
be installed that way (not root); as root a missing program fails the test, so CI never skips it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def find_program(name: str, *fallbacks: str) -> str | None:
    return shutil.which(name) or next((p for p in fallbacks if Path(p).is_file()), None)


def require_programs(programs: dict[str, str | None], packages: str) -> None:
    """Skip (not root) or fail (root) when one of ``programs`` (name -> found path) is missing."""
    missing = [name for name, path in programs.items() if path is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing)} not installed (`make test` installs {packages} with apt-get when run as root)")
    pytest.fail(f"{', '.join(missing)} not installed although this runs as root: run `make system-packages` "
                f"(apt-get install {packages}), as `make test` does")
