"""Credential-free exhaustion attempts against a TLS endpoint on 127.0.0.1 (the coordinator's gateway
or nginx), used by tests/federation/test_security_exhaustion.py and test_security_nginx.py.

Every loop here is bounded in count and in time; every socket has a timeout.
"""

from __future__ import annotations

import select
import socket
import ssl
import statistics
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
GIB = 1 << 30
PIECE = b"\0" * 65536


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (``VmRSS`` in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class PeakRss(threading.Thread):
    """Samples the resident memory of some processes every 50 ms until stopped (at most ``seconds``)."""

    def __init__(self, pids: dict[str, int], seconds: float = 300.0):
        super().__init__(daemon=True)
        self.pids, self.seconds = pids, seconds
        self.before = {name: rss_mib(pid) for name, pid in pids.items()}
        self.peak = dict(self.before)
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.done.wait(0.05) and time.monotonic() < deadline:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mib(pid))

    def stop(self) -> dict[str, tuple[float, float, float]]:
        """``{name: (before, peak, after)}`` in MiB."""
        self.done.set()
        self.join(timeout=5)
        return {name: (self.before[name], self.peak[name], rss_mib(pid)) for name, pid in self.pids.items()}


def tls_connect(port: int, ca: Path, source: str = HOST, timeout: float = 10.0, context: ssl.SSLContext | None = None):
    """A TLS connection from ``source`` (another loopback address stands for another client)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        raw.bind((source, 0))
        raw.connect((HOST, port))
        context = context or ssl.create_default_context(cafile=str(ca))
        return context.wrap_socket(raw, server_hostname=HOST)
    except BaseException:
        raw.close()
        raise


def read_head(sock, timeout: float = 10.0, data: bytes = b"") -> tuple[int, dict[str, str]]:
    """Status and headers of the response on ``sock`` (0 if the connection ended without one);
    ``data``: what was already read of it."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline and len(data) < 65536:
        try:
            chunk = sock.recv(4096)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    if not data.startswith(b"HTTP/1."):
        return 0, {}
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers


def oversized_request(port: int, ca: Path, method: str, path: str, *, declared: int | None = GIB,
                      budget: int = 4 << 20, timeout: float = 20.0) -> tuple[int, int, dict[str, str]]:
    """Send ``method path`` with headers claiming a ``declared``-byte body (``None``: chunked), then
    stream zeros until the server answers or ``budget`` bytes went out. Returns (status, body bytes
    sent before the answer, response headers); status 0 when no response came."""
    sock = tls_connect(port, ca, timeout=timeout)
    framing = "Transfer-Encoding: chunked" if declared is None else f"Content-Length: {declared}"
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/protobuf\r\n{framing}\r\n\r\n"
    sent, answer = 0, b""
    try:
        sock.sendall(head.encode())
        deadline = time.monotonic() + timeout
        while sent < budget and time.monotonic() < deadline:
            answer = early_answer(sock)
            if answer is None or answer:  # closed, or the response began
                break
            piece = f"{len(PIECE):x}\r\n".encode() + PIECE + b"\r\n" if declared is None else PIECE
            try:
                sock.sendall(piece)
            except (OSError, ssl.SSLError):
                break
            sent += len(PIECE)
        status, headers = read_head(sock, timeout, answer or b"")
        return status, sent, headers
    finally:
        sock.close()


def early_answer(sock, wait: float = 0.02) -> bytes | None:
    """Response bytes the server already sent on ``sock`` (b"" if none yet, None if it closed).
    TLS 1.3 session tickets make a socket readable without any response: they are not an answer."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable and not sock.pending():
        return b""
    sock.setblocking(False)
    try:
        return sock.recv(65536) or None
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    except (OSError, ssl.SSLError):
        return None
    finally:
        sock.setblocking(True)


def request(port: int, ca: Path, method: str, path: str, headers: str = "", source: str = HOST,
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str]]:
    """One plain request (``headers``: extra header lines, each ending in CRLF); status and headers."""
    sock = tls_connect(port, ca, source=source, context=context)
    try:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n{headers}\r\n".encode())
        return read_head(sock)
    finally:
        sock.close()


def ended(sock) -> bool:
    """Whether the server has closed, reset or answered a connection we hold (non-blocking check;
    an answer to an unfinished request is a refusal, such as nginx's 429)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable and not sock.pending():
            return False
        sock.recv(1)
        return True
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (OSError, ssl.SSLError, ValueError):
        return True


class IdleConnections(threading.Thread):
    """Opens ``target`` TLS connections from ``source`` that send part of a request and then nothing
    (headers never finished, or with ``stall_body`` a body that stalls after a few bytes), and keeps
    re-opening those the server drops (at most ``per_tick`` per 0.25 s) until stopped, ``seconds``
    have passed or ``max_opens`` connections were tried."""

    def __init__(self, port: int, ca: Path, source: str, target: int = 500, stall_body: bool = False,
                 seconds: float = 400.0, max_opens: int = 12000, per_tick: int = 20):
        super().__init__(daemon=True)
        self.port, self.ca, self.source, self.target, self.stall_body = port, ca, source, target, stall_body
        self.seconds, self.max_opens, self.per_tick = seconds, max_opens, per_tick
        self.context = ssl.create_default_context(cafile=str(ca))
        self.held: list[tuple[object, float]] = []
        self.lifetimes: list[float] = []  # seconds from our last byte to the server ending a held connection
        self.opened = self.refused = self.peak = 0
        self.first_burst: tuple[int, int, float] | None = None  # held, refused, seconds
        self.done = threading.Event()

    def partial(self) -> bytes:
        if self.stall_body:
            return (f"POST /v1/fleet/get-run HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/protobuf\r\n"
                    "Content-Length: 4096\r\n\r\n" + "x" * 16).encode()
        return f"POST /v1/fleet/get-run HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/protobuf\r\n".encode()

    def open_one(self) -> None:
        self.opened += 1
        try:
            sock = tls_connect(self.port, self.ca, source=self.source, timeout=5.0, context=self.context)
            sock.sendall(self.partial())
            sock.setblocking(False)
        except (OSError, ssl.SSLError):
            self.refused += 1
            return
        self.held.append((sock, time.monotonic()))

    def reap(self) -> None:
        now, alive = time.monotonic(), []
        for sock, since in self.held:
            if ended(sock):
                self.lifetimes.append(now - since)
                sock.close()
            else:
                alive.append((sock, since))
        self.held = alive

    def run(self) -> None:
        start = time.monotonic()
        deadline = start + self.seconds
        for _ in range(self.target):  # the burst: as fast as the server takes them
            self.open_one()
        self.first_burst = (len(self.held), self.refused, time.monotonic() - start)
        self.peak = len(self.held)
        while not self.done.wait(0.25) and time.monotonic() < deadline and self.opened < self.max_opens:
            self.reap()
            for _ in range(min(self.per_tick, self.target - len(self.held))):
                self.open_one()
            self.peak = max(self.peak, len(self.held))
            if not self.held and not self.per_tick:  # nothing left to watch, nothing to re-open
                break

    def stop(self) -> dict:
        self.done.set()
        self.join(timeout=30)
        self.reap()
        for sock, _ in self.held:
            sock.close()
        life = sorted(self.lifetimes)
        return {"opened": self.opened, "refused": self.refused, "first_burst": self.first_burst, "peak_held": self.peak,
                "dropped_by_server": len(life), "lifetime_s": (round(life[0], 1), round(statistics.median(life), 1),
                                                               round(life[-1], 1)) if life else None}
