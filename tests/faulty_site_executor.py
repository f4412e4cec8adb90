"""TEST ONLY launcher: a site's task executor whose ClientApp misbehaves as ``tests/site_hooks.py``
says. Started by :func:`site_hooks.use_faulty_executors` in place of ``python -m
arkfed.federation.site.executor``, with the same arguments; nothing of it is in the arkfed package."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arkfed.federation.site import executor  # noqa: E402
from site_hooks import install  # noqa: E402

if __name__ == "__main__":
    install()
    executor.main()
