"""The code passes the ``[tool.ruff]`` configuration of pyproject.toml (pyflakes, pycodestyle, isort, bugbear).

Run as a test so a fresh checkout's ``pytest`` reports an unused import or a mis-sorted import
block in the same place as a failing behaviour; skipped where ruff (in the ``test`` extra) is absent.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "arkfed", "tests", "benchmarks"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    hint = "ruff check found problems (fix them; `ruff check --fix` fixes the [*] ones)"
    assert result.returncode == 0, f"{hint}:\n{result.stdout}{result.stderr}"
