"""The gateway's connection limits: no address, and no pile of idle or half-sent connections, can
take the coordinator's public port away from the sites.

- **Per address and in total**, checked when a connection is accepted, before its TLS handshake
  (:class:`CappedListener`): a connection over ``per_address`` open ones from the same client
  address, or over ``total`` in all, is reset at once. Counted per IP address (an IPv6 client
  holding a whole prefix counts once per address it uses).
- **TLS handshake** within ``handshake_timeout`` and a closing handshake within
  ``shutdown_timeout`` (:class:`GatewayLoop`; asyncio's defaults are 60 s and 30 s).
- **Request headers** complete within ``header_timeout`` of the connection's start, or of the first
  byte of a later request on a kept-alive connection; a **request body** that stalls for
  ``body_timeout`` between two reads (while the gateway is reading) ends the connection; an idle
  kept-alive connection closes after ``keepalive_timeout`` (:class:`GuardedH11Protocol`, uvicorn's
  HTTP/1.1 protocol with these timers; uvicorn itself has none for headers or bodies).

Without these, 520 TLS connections with unfinished headers held every slot of uvicorn's
concurrency limit and every request got 503 for as long as they stayed (issue 21). Bounds:
``per_address`` connections from one address for at most ``handshake_timeout + header_timeout``
seconds each unless they send a complete request; ``total`` in all.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("arkfed.gateway")
ACCEPT_BATCH = 64  # connections refused per accept() call before the event loop gets a turn
REPORT_EVERY = 10.0  # seconds between two log lines about refused connections


@dataclass(frozen=True)
class ConnectionLimits:
    per_address: int = 32  # a SuperNode uses 1-3 connections; several sites may share a NAT address
    total: int = 1024
    handshake_timeout: float = 10.0
    shutdown_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: int = 30


class CappedListener(socket.socket):
    """A listening socket whose ``accept`` resets connections over the per-address or total cap;
    the ones it hands out (:class:`CountedSocket`) give their slot back when closed."""

    def __init__(self, family: int, limits: ConnectionLimits):
        super().__init__(family, socket.SOCK_STREAM)
        self.limits = limits
        self.open: Counter[str] = Counter()
        self.total = 0
        self.refused: Counter[str] = Counter()
        self.reported = time.monotonic() - REPORT_EVERY  # the first reset is logged at once

    def accept(self):
        for _ in range(ACCEPT_BATCH):
            fd, addr = self._accept()  # BlockingIOError when nobody waits: the event loop's cue to stop
            host = addr[0]
            if self.open[host] < self.limits.per_address and self.total < self.limits.total:
                self.open[host] += 1
                self.total += 1
                return CountedSocket(self, host, fd), addr
            reset(fd)
            self.note_refused(host)
        raise BlockingIOError("accept batch done; the event loop calls again")

    def release(self, host: str) -> None:
        self.total -= 1
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]

    def note_refused(self, host: str) -> None:
        self.refused[host] += 1
        now = time.monotonic()
        if now - self.reported >= REPORT_EVERY:
            busiest = ", ".join(f"{h} ({n})" for h, n in self.refused.most_common(5))
            log.warning("reset %d connection(s) over the caps (%d per address, %d in all) in %.0f s: %s; open now: %d",
                        sum(self.refused.values()), self.limits.per_address, self.limits.total, now - self.reported,
                        busiest, self.total)
            self.refused.clear()
            self.reported = now


class CountedSocket(socket.socket):
    """An accepted connection that returns its slot to the :class:`CappedListener` when closed."""

    def __init__(self, listener: CappedListener, host: str, fd: int):
        super().__init__(listener.family, listener.type, listener.proto, fileno=fd)
        self.release_slot = lambda: listener.release(host)

    def give_back(self) -> None:
        release, self.release_slot = getattr(self, "release_slot", None), None
        if release is not None:
            release()

    def close(self) -> None:
        self.give_back()
        super().close()

    def __del__(self) -> None:  # never closed (a transport that failed to start): its slot still comes back
        self.give_back()
        super().__del__()


def reset(fd: int) -> None:
    """Close an accepted connection with a TCP reset (no lingering state on our side)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class GatewayLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop (uvloop would accept in C, past :class:`CappedListener`), with the
    TLS handshake and shutdown timeouts of :class:`ConnectionLimits` on every TLS server."""

    limits = ConnectionLimits()

    async def create_server(self, protocol_factory, *args, **kwargs):
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.limits.handshake_timeout)
            kwargs.setdefault("ssl_shutdown_timeout", self.limits.shutdown_timeout)
        return await super().create_server(protocol_factory, *args, **kwargs)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus one timer per connection: the header timeout while a request's
    headers are incomplete, the body timeout while its body is being received."""

    limits = ConnectionLimits()
    guard: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm(self.limits.header_timeout, "headers")

    def data_received(self, data: bytes) -> None:
        if self.guard is None and self.conn.their_state is h11.IDLE:  # the first bytes of the next request
            self.arm(self.limits.header_timeout, "headers")
        super().data_received(data)
        self.follow()

    def on_response_complete(self) -> None:
        self.disarm()
        super().on_response_complete()  # idle from here: uvicorn's keep-alive timer
        self.follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def follow(self) -> None:
        """Headers done: the body timer (reset by every read) while a body comes, none after."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self.arm(self.limits.body_timeout, "body")
        elif state is not h11.IDLE:
            self.disarm()

    def arm(self, seconds: float, what: str) -> None:
        self.disarm()
        self.guard = self.loop.call_later(seconds, self.expire, what)

    def disarm(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None

    def expire(self, what: str) -> None:
        self.guard = None
        if what == "body" and self.flow.read_paused:  # the gateway is not reading (upstream busy): not the client's doing
            self.arm(self.limits.body_timeout, what)
            return
        if self.transport.is_closing():
            return
        seconds = self.limits.header_timeout if what == "headers" else self.limits.body_timeout
        host = self.client[0] if self.client else "?"
        log.info("closed a connection from %s: request %s incomplete after %.0f s", host, what, seconds)
        self.transport.abort()


def listen(host: str, port: int, limits: ConnectionLimits, backlog: int = 2048) -> CappedListener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = CappedListener(family, limits)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(False)
    return sock


def serve(config, limits: ConnectionLimits) -> None:
    """Run uvicorn ``config`` on a :class:`CappedListener` in a :class:`GatewayLoop`, with
    :class:`GuardedH11Protocol` as its HTTP protocol, until a signal stops it."""
    import uvicorn

    config.http = type("GatewayH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    loop_class = type("ConfiguredGatewayLoop", (GatewayLoop,), {"limits": limits})
    sock = listen(config.host, config.port, limits, config.backlog)
    with asyncio.Runner(loop_factory=loop_class) as runner:
        runner.run(uvicorn.Server(config).serve(sockets=[sock]))
