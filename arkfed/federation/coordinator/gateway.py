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

What it refuses before anything reaches Flower (the SuperLink reads a whole request body before it
checks who sent it, so the gateway is where size and time are bounded). Request bodies: a
``Content-Length`` over the route's limit is answered 413 before a byte of the body is read, and a
chunked body is counted as it streams and cut off with 413 at the limit (:class:`BodyLimits`;
``push-object``, the one route that carries model arrays, gets :func:`push_object_limit`, sized
from the run's model, or with secure aggregation :func:`masked_vector_bytes`, a masked update's
size; every other route 1 MiB). ``/health`` with a body is a 400. Connections
(:mod:`arkfed.federation.coordinator.connections`): a cap per client address and in total,
checked when a connection is accepted; TLS handshake, request-header, body-idle and keep-alive
timeouts. TLS 1.2 with AEAD suites only, or 1.3; no ``Server`` header of its own or the
SuperLink's; one log line per failure, never a traceback; the log rotates (:func:`setup_logging`).

Run as ``python -m arkfed.federation.coordinator.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT ...``
(the coordinator starts it as a child process; its log is ``RUN/logs/gateway.log``, rotated).
No torch or arkfed-heavy import at module level: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

FLEET_ROUTES = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
)
SELF_REGISTRATION_ROUTES = ("register-node", "unregister-node")  # only without SuperNode authentication
HEALTH_PATH = "/health"
PUSH_OBJECT_PATH = "/v1/fleet/push-object"

# RFC 9110 section 7.6.1 hop-by-hop headers, plus what the proxy sets itself
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-real-ip",
}
RESPONSE_DROPPED = HOP_BY_HOP | {"server", "date", "x-powered-by"}  # the SuperLink's software stays unnamed

# Request-body limits. Flower 1.42 moves a message's content as separate objects, one push-object
# request each, and cuts every Array into ArrayChunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
# (5 MiB unless that variable is set; tests check the value against flwr.common.constant). A site's
# largest legitimate request is therefore one chunk of its reply's model arrays: never more than the
# model's state (arkfed packs it into one flat array per dtype) and never more than a chunk.
FLOWER_CHUNK_BYTES = 5 * 1024 * 1024
OBJECT_MARGIN = 1024 * 1024  # object header and protobuf framing, and any non-array object (config/metric records)
SMALL_BODY_LIMIT = 1024 * 1024  # every other Fleet request: protobuf metadata only (messages travel without content)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # AEAD with forward secrecy; TLS 1.3's suites are all AEAD

log = logging.getLogger("arkfed.gateway")


def fleet_paths(supernode_auth: bool) -> list[str]:
    """The Fleet paths forwarded: all of them, less self-registration when sites are authenticated."""
    return [f"/v1/fleet/{name}" for name in FLEET_ROUTES if not (supernode_auth and name in SELF_REGISTRATION_ROUTES)]


def push_object_limit(model_bytes: int | None, chunk: int | None = None) -> int:
    """Largest ``push-object`` body the gateway accepts: ``min(model_bytes, chunk) + OBJECT_MARGIN``.

    ``model_bytes`` is the size of the run's model state (parameters and buffers, as packed by
    :func:`arkfed.federation.messages.model_record`; ``None``: unknown, then the chunk bound
    alone), ``chunk`` Flower's array chunk size (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB).
    Swin-B (352 MB of state): 6 MiB; timm's ``test_resnet`` (1.5 MB): 2.4 MiB."""
    if chunk is None:
        chunk = int(os.environ.get("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", FLOWER_CHUNK_BYTES))
    largest = chunk if model_bytes is None else min(int(model_bytes), chunk)
    return largest + OBJECT_MARGIN


def model_state_bytes(spec) -> int:
    """Bytes of an :class:`~arkfed.model.ark.ArkModel`'s state for ``spec`` (built on torch's meta
    device: no memory; 0.6 s for Swin-B on a busy CPU)."""
    import torch

    from arkfed.model.ark import ArkModel

    with torch.device("meta"):
        model = ArkModel(spec)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def masked_vector_bytes(spec) -> int:
    """Bytes of one site's SecAgg+ masked vector for ``spec``: Flower's ``secaggplus_mod`` sends every
    floating-point value of the update as an int64, one serialised array per tensor (plus the
    weight), all in one config record, which Flower does not cut into chunks as it does arrays."""
    import torch

    from arkfed.model.ark import ArkModel

    with torch.device("meta"):
        model = ArkModel(spec)
    floats = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
    return sum(8 * t.numel() + 128 for t in floats) + 256  # 128: a .npy header


def run_push_object_limit(run_dir: Path) -> int:
    """:func:`push_object_limit` for the run in ``run_dir`` (its ``config.yaml``'s model); the chunk
    bound if the folder holds no run or the model cannot be built."""
    from arkfed.run.folder import RunFolder

    try:
        run = RunFolder(Path(run_dir))
        if not run.has_run():
            return push_object_limit(None)
        config = run.read_config()
        limit = push_object_limit(model_state_bytes(config.model))
        if config.secure_aggregation:  # Flower's SecAgg+ sends a site's masked vector as one unchunked object
            limit = max(limit, masked_vector_bytes(config.model) + OBJECT_MARGIN)
        return limit
    except Exception as exc:  # noqa: BLE001 - the bound without the model is still a bound
        log.warning("model size of %s unknown (%s): Flower's chunk bound applies", run_dir, type(exc).__name__)
        return push_object_limit(None)


@dataclass(frozen=True)
class BodyLimits:
    """Request-body limits in bytes: ``push_object`` for push-object, ``other`` for every other route."""

    push_object: int = FLOWER_CHUNK_BYTES + OBJECT_MARGIN
    other: int = SMALL_BODY_LIMIT

    def for_path(self, path: str) -> int:
        return self.push_object if path == PUSH_OBJECT_PATH else self.other


class BodyTooLarge(Exception):
    """A streamed (chunked) request body went past its route's limit."""


async def counted(stream, limit: int):
    """``stream``'s chunks, raising :class:`BodyTooLarge` as soon as more than ``limit`` bytes came."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"over {limit} bytes")
        yield chunk


def early_refusal(method: str, headers, limit: int) -> tuple[int, str] | None:
    """Status and text for a request refused on its headers alone, before any body is read."""
    length, chunked = headers.get("content-length"), "transfer-encoding" in headers
    if method != "POST":
        if chunked or length not in (None, "0"):
            return 400, "bad request: a health check carries no body\n"
        return None
    try:
        declared = int(length) if length is not None else 0
    except ValueError:
        return 400, "bad request: invalid Content-Length\n"
    if declared > limit:
        return 413, f"request body over this route's limit of {limit} bytes\n"
    return None


def create_app(upstream: str, upstream_ca: str | None, supernode_auth: bool, transport=None,
               limits: BodyLimits | None = None):
    """The gateway's ASGI app: fixed Fleet routes to ``upstream`` (``https://127.0.0.1:PORT`` or
    ``http://``), bodies bounded by ``limits``; ``transport`` replaces the network for tests (an
    ``httpx`` transport)."""
    import contextlib

    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    limits = limits or BodyLimits()
    verify: ssl.SSLContext | bool = False
    if upstream.startswith("https://"):
        verify = ssl.create_default_context(cafile=upstream_ca)
    client = httpx.AsyncClient(
        base_url=upstream, verify=verify, http2=False, follow_redirects=False, trust_env=False,
        timeout=httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), transport=transport,
    )

    def answer(status: int, text: str, request: Request) -> Response:
        who = request.client.host if request.client else "?"
        log.warning("answered %d to %s %s from %s: %s", status, request.method, request.url.path[:200], who, text.strip())
        return PlainTextResponse(text, status_code=status, headers={"connection": "close"})  # the rest of a body is never read

    async def relay(request: Request, path: str, limit: int) -> Response:
        dropped = HOP_BY_HOP if request.method == "POST" else HOP_BY_HOP | {"content-length"}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in dropped]
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        body = counted(request.stream(), limit) if request.method == "POST" else None
        upstream_request = client.build_request(request.method, path, headers=headers, content=body)
        try:
            reply = await client.send(upstream_request, stream=True)
        except BodyTooLarge:
            return answer(413, f"request body over this route's limit of {limit} bytes\n", request)
        except ClientDisconnect:
            return answer(400, "bad request: the client went away mid-body\n", request)
        except httpx.HTTPError as exc:
            log.warning("upstream %s unreachable for %s: %s", upstream, path, type(exc).__name__)
            return PlainTextResponse("coordinator unavailable\n", status_code=502)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in RESPONSE_DROPPED}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=out_headers,
                                 background=BackgroundTask(reply.aclose))

    def forward(path: str):
        limit = limits.for_path(path)

        async def endpoint(request: Request) -> Response:
            refusal = early_refusal(request.method, request.headers, limit)
            if refusal is not None:
                return answer(*refusal, request)
            try:
                return await relay(request, path, limit)
            except Exception as exc:  # noqa: BLE001 - one log line, never a traceback per request
                log.warning("failed %s %s: %s", request.method, path, type(exc).__name__)
                return PlainTextResponse("coordinator unavailable\n", status_code=502)

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


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A size-rotated log that, when the process's stdout and stderr are that file (the coordinator
    starts the gateway so), points them at the fresh file after each rotation too."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        try:
            same = os.path.samestat(os.fstat(1), os.stat(path))
        except OSError:
            same = False
        self.follow_std = same

    def doRollover(self) -> None:
        super().doRollover()
        if self.follow_std and self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def setup_logging(log_file: str | None, max_bytes: int, backups: int) -> None:
    """Everything (arkfed's lines, uvicorn's access and error lines) to ``log_file``, rotated at
    ``max_bytes`` with ``backups`` old files kept (at most ``(backups + 1) * max_bytes`` in all);
    to stdout without ``log_file``."""
    handler = RotatingLog(Path(log_file), max_bytes, backups) if log_file else logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # uvicorn's access line already records each request


def harden_tls(config, default_factory) -> ssl.SSLContext:
    """uvicorn's context for our certificate, limited to TLS 1.2 with AEAD suites, or TLS 1.3."""
    context = default_factory()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from arkfed.federation.coordinator.connections import ConnectionLimits

    d = ConnectionLimits()
    parser = argparse.ArgumentParser(description="arkfed Fleet gateway: forwards only Flower's Fleet API")
    add = parser.add_argument
    add("--listen", required=True, help="HOST:PORT to serve (the coordinator's public address)")
    add("--upstream", required=True, help="127.0.0.1:PORT of the SuperLink")
    add("--certfile", help="the coordinator's TLS certificate (omit with --insecure)")
    add("--keyfile", help="the coordinator's TLS key")
    add("--upstream-ca", help="CA that signed the SuperLink's certificate (the federation's ca.crt)")
    add("--supernode-auth", action="store_true", help="sites are authenticated: never forward self-registration")
    add("--insecure", action="store_true", help="plain HTTP both ways (trials only)")
    add("--max-push-object", type=int, default=BodyLimits.push_object, help="push-object body limit, bytes (push_object_limit)")
    add("--max-body", type=int, default=SMALL_BODY_LIMIT, help="body limit of every other route, bytes")
    add("--max-connections-per-address", type=int, default=d.per_address, help="open connections one client address may hold")
    add("--max-connections", type=int, default=d.total, help="open connections in all")
    add("--handshake-timeout", type=float, default=d.handshake_timeout, help="seconds for a TLS handshake")
    add("--header-timeout", type=float, default=d.header_timeout, help="seconds to a request's last header byte")
    add("--body-timeout", type=float, default=d.body_timeout, help="seconds a request body may stall between two reads")
    add("--keepalive-timeout", type=int, default=d.keepalive_timeout, help="seconds an idle keep-alive connection stays open")
    add("--log-file", help="write the log here, rotated (default: stdout)")
    add("--log-max-bytes", type=int, default=4 * 1024 * 1024, help="rotate the log file at this size")
    add("--log-backups", type=int, default=4, help="rotated log files kept")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from arkfed.federation.coordinator.connections import ConnectionLimits, serve

    args = parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not args.insecure and not (args.certfile and args.keyfile and args.upstream_ca):
        sys.exit("gateway: --certfile, --keyfile and --upstream-ca are required unless --insecure")
    scheme = "http" if args.insecure else "https"
    setup_logging(args.log_file, args.log_max_bytes, args.log_backups)
    bodies = BodyLimits(push_object=args.max_push_object, other=args.max_body)
    conns = ConnectionLimits(per_address=args.max_connections_per_address, total=args.max_connections,
                             handshake_timeout=args.handshake_timeout, header_timeout=args.header_timeout,
                             body_timeout=args.body_timeout, keepalive_timeout=args.keepalive_timeout)
    app = create_app(f"{scheme}://{args.upstream}", args.upstream_ca, args.supernode_auth, limits=bodies)
    log.info("forwarding %s (%s) to %s://%s; everything else is refused",
             ", ".join(fleet_paths(args.supernode_auth)), HEALTH_PATH, scheme, args.upstream)
    log.info("limits: %s; %s", bodies, conns)
    config = uvicorn.Config(
        app, host=host.strip("[]") or "0.0.0.0", port=int(port), ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
        ssl_context_factory=None if args.insecure else harden_tls, proxy_headers=False, server_header=False,
        date_header=True, limit_concurrency=None, timeout_keep_alive=conns.keepalive_timeout, log_config=None,
        log_level="info", access_log=True, ws="none", lifespan="on",
    )
    serve(config, conns)


if __name__ == "__main__":
    main()
