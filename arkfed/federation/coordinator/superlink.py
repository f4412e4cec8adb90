"""The coordinator's Flower SuperLink, answering this machine's coordinator account only.

Flower 1.42's SuperLink serves its Control API (start and stop runs, register SuperNodes), its
runtime API and its Fleet API over HTTP on one ``--host``/``--port``; open-source Flower does not
authenticate the Control API, and it cannot listen on a Unix socket: addresses must be
``HOST:PORT`` (``flwr.supercore.address.parse_address`` rejects ``unix:`` targets; the deprecated
gRPC ``--control-api-address`` parses its address the same way, and the ``flwr`` CLI's connection
needs ``HOST:PORT`` too). On 127.0.0.1 every local account can connect.

``python -m arkfed.federation.coordinator.superlink ARGS`` therefore runs Flower's own
``flower-superlink ARGS`` with one ASGI layer in front of Flower's app (:class:`SameAccountOnly`):
every HTTP request is answered only if the TCP connection it came on belongs to this process's
own account, except the Fleet routes the public gateway forwards from anyone anyway
(:func:`public_routes`: a SuperNode's Fleet calls, which Flower authenticates with the site's key,
and ``/health``), so that nginx's workers, another account, can forward them too. The kernel
says whose a connection is: ``/proc/net/tcp`` lists every socket with the account that created it,
so the client end of the connection (local address = the request's client address, remote = the
SuperLink's) names its account; both ends must be established. A
request from any other account is answered 403 (Flower's error format, code 1008) before Flower
sees it, and counted in the SuperLink's log. uvicorn's proxy headers are off, so an
``X-Forwarded-For`` header (the Fleet gateway's, or anyone's) never stands in for the connection's
address. The coordinator's own processes (``flwr`` CLI, arkfed's launcher and ServerApp, the Fleet
gateway, which forwards the sites' Fleet requests) all run as the coordinator's account. Where
``/proc/net/tcp`` does not exist (not Linux) the guard cannot work and the SuperLink does not start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
from pathlib import Path

ESTABLISHED = "01"
REFUSED_BODY = json.dumps({"code": 1008, "detail": "arkfed: this SuperLink answers the coordinator's own account only"})


def _hex_address(host: str, port: int) -> str:
    """``/proc/net/tcp``'s form of an IPv4 address and port (little-endian address on x86 and arm)."""
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"


def connection_uid(client: tuple[str, int], server: tuple[str, int], table: Path = Path("/proc/net/tcp")) -> int | None:
    """The account owning the client end of the established TCP connection ``client`` -> ``server``
    (None if there is no such connection, or it is closing)."""
    if not ipaddress.ip_address(client[0]).version == 4:
        return None
    local, remote = _hex_address(*client), _hex_address(*server)
    owner, server_end = None, False
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()  # sl, local, remote, state, queues, timer, retransmits, uid, ...
        if len(fields) < 8 or fields[3] != ESTABLISHED:
            continue
        if fields[1] == local and fields[2] == remote:
            owner = int(fields[7])
        elif fields[1] == remote and fields[2] == local:
            server_end = True
    return owner if server_end else None


class SameAccountOnly:
    """ASGI layer: HTTP requests only from connections of this process's account, except the public
    routes ``public`` (``{(method, path)}``: what the Fleet gateway forwards from anyone), which any
    account may call (see the module docstring)."""

    def __init__(self, app, uid: int | None = None, public: set[tuple[str, str]] = frozenset()):
        self.app, self.uid, self.public = app, os.getuid() if uid is None else uid, set(public)
        self.refused, self.last_report = 0, 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope.get("method"), scope.get("path")) not in self.public:
            client, server = scope.get("client"), scope.get("server")
            try:
                uid = connection_uid(tuple(client), tuple(server)) if client and server else None
            except (OSError, ValueError):
                uid = None
            if uid != self.uid:
                self._report(uid, scope.get("path", ""))
                await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": REFUSED_BODY.encode()})
                return
        await self.app(scope, receive, send)

    def _report(self, uid: int | None, path: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.last_report >= 5.0 or self.refused == 1:  # bounded log: one line per 5 s at most
            self.last_report = now
            who = "an unknown account" if uid is None else f"account {uid}"
            print(f"arkfed: refused {path[:80]} from {who} (not the coordinator's); {self.refused} refused so far", flush=True)


def public_routes(supernode_auth: bool) -> set[tuple[str, str]]:
    """What any local account may call: exactly what the Fleet gateway forwards from the network
    (the Fleet routes a SuperNode uses, POST, and ``GET /health``); a local account gets nothing a
    network outsider does not get through the gateway, and nginx's workers (another account) reach them."""
    from arkfed.federation.coordinator.gateway import HEALTH_PATH, fleet_paths

    return {("POST", path) for path in fleet_paths(supernode_auth)} | {("GET", HEALTH_PATH)}


def main(argv: list[str] | None = None) -> None:
    if not Path("/proc/net/tcp").is_file():
        sys.exit("arkfed: cannot tell which account a connection belongs to here (no /proc/net/tcp); "
                 "the coordinator's SuperLink needs Linux")
    import importlib
    import types

    import uvicorn

    flower_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module (its package exports a function of that name)
    flower_main = importlib.import_module("flwr.superlink.main")

    create_app = flower_main.create_app

    def guarded_app(*args, **kwargs):
        return SameAccountOnly(create_app(*args, **kwargs), public=public_routes("--enable-supernode-auth" in sys.argv))

    def run_without_proxy_headers(*args, **kwargs):
        # uvicorn would otherwise take the client address from X-Forwarded-For (which the Fleet
        # gateway sets, and any local account could): the guard needs the connection's own address
        return uvicorn.run(*args, **kwargs, proxy_headers=False)

    flower_main.create_app = guarded_app  # flower_superlink imports it from there when it starts
    flower_cli.uvicorn = types.SimpleNamespace(run=run_without_proxy_headers)
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_cli.flower_superlink()


if __name__ == "__main__":
    main()
