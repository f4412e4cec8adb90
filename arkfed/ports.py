"""A free TCP port: the one helper the DDP rendezvous and the Flower processes share.

A leaf (standard library only), so that every layer may use it.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free at this moment on ``host`` (the OS picks it; loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
