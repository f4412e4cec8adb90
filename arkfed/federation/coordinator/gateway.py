"""The coordinator's public face: a reverse proxy that forwards Flower's Fleet API and nothing else.

Why it exists. Flower 1.42's SuperLink is one FastAPI app served by uvicorn on ONE port, and that
port carries three APIs: ``/v1/fleet/*`` (what SuperNodes use), ``/v1/control/*`` (``flwr run``,
``flwr ls``, ``flwr supernode register``: the open-source build authenticates none of it) and
``/v1/runtime/*`` (the ServerApp's link to the SuperLink). Exposed as is, anyone who can reach the
port and holds ``ca.crt`` (every site has it) can list runs, start their own app and register
their own SuperNode key. So :class:`~arkfed.federation.coordinator.launcher.Coordinator` binds the SuperLink
to 127.0.0.1 and puts this gateway on the public address.

What it does. Exactly the Fleet routes a SuperNode calls (:data:`FLEET_ROUTES`, POST) and
``/health`` (GET/HEAD) are forwarded; every other method or path, including ``/v1/control/*``,
``/v1/runtime/*``, ``/docs`` and ``/openapi.json``, is answered 404 by the gateway itself and
never reaches the SuperLink. Matching is on the decoded path against a fixed list and the
upstream URL is built from the list entry, never from the client's raw path or query, so
percent-encoding, ``..`` or a trailing query cannot smuggle another route through. With SuperNode
authentication on, the Fleet ``register-node``/``unregister-node`` routes are not forwarded either
(the SuperLink refuses them then anyway; sites are registered by the coordinator through the
loopback Control API). TLS is terminated here with the coordinator's certificate; the hop to the
SuperLink is TLS again on loopback, verified against the federation's CA (Flower refuses SuperNode
authentication without TLS). SuperNode authentication itself is end to end: each request carries
the site's signature in headers, which pass through unchanged and are checked by the SuperLink.

Why this design. In Flower 1.42 the Fleet transport is protobuf over plain HTTP/1.1 (the SuperNode
uses ``httpx``; gRPC Fleet servers only start under ``FLWR_INTERNAL_GRPC_*`` variables, which
:func:`arkfed.federation.processes.flower_env` removes), so an ordinary HTTP reverse proxy proxies
it faithfully. It is built from the parts Flower itself installs and maintains: ``starlette``
routing, ``httpx``'s async client for the upstream hop and ``uvicorn`` (with its TLS) as server;
bodies stream both ways (model arrays are large), nothing here parses HTTP. Institutions whose IT
runs its own reverse proxy can use ``deploy/nginx/arkfed-fleet.conf`` instead, which forwards the
same list.

Run as ``python -m arkfed.federation.coordinator.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT ...``
(the coordinator starts it as a child process; its access log is ``RUN/logs/gateway.log``).
No torch or arkfed-heavy import here: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys

FLEET_ROUTES = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
)
SELF_REGISTRATION_ROUTES = ("register-node", "unregister-node")  # only without SuperNode authentication
HEALTH_PATH = "/health"

# RFC 9110 section 7.6.1 hop-by-hop headers, plus what the proxy sets itself
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-real-ip",
}

log = logging.getLogger("arkfed.gateway")


def fleet_paths(supernode_auth: bool) -> list[str]:
    """The Fleet paths forwarded: all of them, less self-registration when sites are authenticated."""
    return [f"/v1/fleet/{name}" for name in FLEET_ROUTES if not (supernode_auth and name in SELF_REGISTRATION_ROUTES)]


def create_app(upstream: str, upstream_ca: str | None, supernode_auth: bool, transport=None):
    """The gateway's ASGI app: fixed Fleet routes to ``upstream`` (``https://127.0.0.1:PORT`` or
    ``http://``); ``transport`` replaces the network for tests (an ``httpx`` transport)."""
    import contextlib

    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    verify: ssl.SSLContext | bool = False
    if upstream.startswith("https://"):
        verify = ssl.create_default_context(cafile=upstream_ca)
    client = httpx.AsyncClient(
        base_url=upstream, verify=verify, http2=False, follow_redirects=False, trust_env=False,
        timeout=httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), transport=transport,
    )

    def forward(path: str):
        async def endpoint(request: Request) -> Response:
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
            if request.client is not None:
                headers.append(("x-forwarded-for", request.client.host))
            body = request.stream() if request.method == "POST" else None
            upstream_request = client.build_request(request.method, path, headers=headers, content=body)
            try:
                reply = await client.send(upstream_request, stream=True)
            except httpx.HTTPError as exc:
                log.warning("upstream %s unreachable for %s: %s", upstream, path, type(exc).__name__)
                return PlainTextResponse("coordinator unavailable\n", status_code=502)
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
            return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=out_headers,
                                     background=BackgroundTask(reply.aclose))

        return endpoint

    async def refuse(request: Request, exc: Exception) -> Response:
        client_host = request.client.host if request.client else "?"
        log.warning("refused %s %s from %s: not a Fleet route", request.method, request.url.path[:200], client_host)
        return PlainTextResponse("not found: this address serves the Flower Fleet API only\n", status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    routes = [Route(p, forward(p), methods=["POST"]) for p in fleet_paths(supernode_auth)]
    routes.append(Route(HEALTH_PATH, forward(HEALTH_PATH), methods=["GET"]))  # starlette adds HEAD
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: refuse, 405: refuse})
    app.router.redirect_slashes = False
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="arkfed Fleet gateway: forwards only Flower's Fleet API")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve (the coordinator's public address)")
    parser.add_argument("--upstream", required=True, help="127.0.0.1:PORT of the SuperLink")
    parser.add_argument("--certfile", help="the coordinator's TLS certificate (omit with --insecure)")
    parser.add_argument("--keyfile", help="the coordinator's TLS key")
    parser.add_argument("--upstream-ca", help="CA that signed the SuperLink's certificate (the federation's ca.crt)")
    parser.add_argument("--supernode-auth", action="store_true", help="sites are authenticated: never forward self-registration")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP both ways (trials only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not args.insecure and not (args.certfile and args.keyfile and args.upstream_ca):
        sys.exit("gateway: --certfile, --keyfile and --upstream-ca are required unless --insecure")
    scheme = "http" if args.insecure else "https"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stdout)
    app = create_app(f"{scheme}://{args.upstream}", args.upstream_ca, args.supernode_auth)
    log.info("forwarding %s (%s) to %s://%s; everything else is refused",
             ", ".join(fleet_paths(args.supernode_auth)), HEALTH_PATH, scheme, args.upstream)
    uvicorn.run(
        app, host=host.strip("[]") or "0.0.0.0", port=int(port), ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
        proxy_headers=False, server_header=False, date_header=True, limit_concurrency=512, timeout_keep_alive=30,
        log_level="info", access_log=True, http="h11", ws="none", lifespan="on",
    )


if __name__ == "__main__":
    main()
