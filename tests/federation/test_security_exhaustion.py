"""Issue 21, problems 3 and 4: nobody without credentials can exhaust the coordinator's memory or
connections through its public address.

In process: the push-object limit is sized from the run's model and Flower's array chunks (and
the largest object a visit reply really holds fits under it); the gateway answers 413 to a body
over its route's limit before reading it (declared) or as soon as it passes it (chunked), a health
check with a body is a 400, and the SuperLink's ``Server`` header is not passed on.

Against real processes on 127.0.0.1 (slow): a 1 GiB body to every forwarded route is refused
early and the SuperLink's memory does not grow; 500 connections with unfinished headers from one
address (127.0.0.2) do not stop a site on another (127.0.0.1) from training a visit; TLS 1.2 offers
AEAD suites only; the gateway's log rotates within its bound and holds no traceback.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from arkfed.federation.coordinator.gateway import (
    FLOWER_CHUNK_BYTES,
    OBJECT_MARGIN,
    BodyLimits,
    create_app,
    fleet_paths,
    model_state_bytes,
    push_object_limit,
)
from arkfed.spec import ModelSpec
from exhaustion import GIB, IdleConnections, PeakRss, oversized_request, read_head, request, tls_connect

TINY = ModelSpec(model="test_resnet", img_size=32, projector_dim=16)


def test_the_push_object_limit_is_sized_from_the_model_and_flowers_chunks(monkeypatch):
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    from arkfed.federation.messages import model_record
    from arkfed.model.ark import ArkModel

    monkeypatch.delenv("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", raising=False)
    assert FLOWER_CHUNK_BYTES == FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # Flower's own chunk size
    model = ArkModel(TINY)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model_state_bytes(TINY) == state  # built on the meta device, same count
    limit = push_object_limit(state)
    assert limit == state + OBJECT_MARGIN < FLOWER_CHUNK_BYTES
    assert push_object_limit(352_614_496) == push_object_limit(None) == FLOWER_CHUNK_BYTES + OBJECT_MARGIN  # Swin-B: a chunk
    # every object a reply carrying this model pushes (record, arrays, chunks) fits, protobuf framing included
    record = model_record(model)
    objects = [record.deflate()] + [a.deflate() for a in record.values()]
    objects += [chunk.deflate() for a in record.values() for _, chunk in a.slice_array()]
    assert max(len(o) for o in objects) + 256 < limit
    print(f"\ntest_resnet state {state} B -> push-object limit {limit} B; largest object {max(len(o) for o in objects)} B; "
          f"Swin-B -> {push_object_limit(352_614_496)} B")


def test_the_gateway_refuses_oversized_bodies_before_reading_them():
    """In process, a stand-in upstream recording what reached it; limits of 64 KiB and 4 KiB."""
    reached = []

    async def upstream(scope, receive, send):
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        reached.append((scope["path"], len(body)))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"server", b"uvicorn"), (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def chunks(total: int):
        for _ in range(total // 1024):
            yield b"x" * 1024

    async def scenario():
        app = create_app("http://upstream", None, supernode_auth=True, transport=httpx.ASGITransport(app=upstream),
                         limits=BodyLimits(push_object=64 * 1024, other=4 * 1024))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            push, get_run = "/v1/fleet/push-object", "/v1/fleet/get-run"
            return {
                "claims 1 GiB": await client.post(push, content=b"x" * 10, headers={"content-length": str(GIB)}),
                "push 60 KiB": await client.post(push, content=b"x" * 60 * 1024),
                "get-run 8 KiB": await client.post(get_run, content=b"x" * 8 * 1024),
                "get-run 3 KiB": await client.post(get_run, content=b"x" * 3 * 1024),
                "chunked 100 KiB": await client.post(push, content=chunks(100 * 1024)),
                "chunked 60 KiB": await client.post(push, content=chunks(60 * 1024)),
                "health": await client.get("/health"),
                "health with a body": await client.get("/health", headers={"content-length": "5"}),
                "health chunked": await client.request("HEAD", "/health", headers={"transfer-encoding": "chunked"}),
            }

    replies = asyncio.run(scenario())
    codes = {what: r.status_code for what, r in replies.items()}
    assert codes == {"claims 1 GiB": 413, "push 60 KiB": 200, "get-run 8 KiB": 413, "get-run 3 KiB": 200,
                     "chunked 100 KiB": 413, "chunked 60 KiB": 200, "health": 200, "health with a body": 400,
                     "health chunked": 400}, codes
    assert reached == [("/v1/fleet/push-object", 60 * 1024), ("/v1/fleet/get-run", 3 * 1024),
                       ("/v1/fleet/push-object", 60 * 1024), ("/health", 0)]
    assert replies["claims 1 GiB"].headers["connection"] == "close"  # the rest of that body is never read
    assert "server" not in replies["health"].headers and replies["health"].headers.get("date") != "Thu, 01 Jan 1970 00:00:00 GMT"


def test_the_listener_resets_connections_over_the_per_address_cap_and_gives_slots_back():
    import gc

    from arkfed.federation.coordinator.connections import CappedListener, ConnectionLimits

    listener = CappedListener(socket.AF_INET, ConnectionLimits(per_address=2, total=3))
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    clients.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
    try:
        first, _ = listener.accept()
        second, _ = listener.accept()
        other, addr = listener.accept()  # the third from 127.0.0.1 was reset on the way
        assert addr[0] == "127.0.0.2" and listener.open == {"127.0.0.1": 2, "127.0.0.2": 1} and listener.total == 3
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            clients[2].recv(1)
        first.close()
        del second  # never closed: its slot comes back when it is collected
        gc.collect()
        other.close()
        assert listener.open == {} and listener.total == 0
    finally:
        for sock in clients:
            sock.close()
        listener.close()


def test_a_later_run_whose_model_needs_a_larger_limit_is_refused_at_submission(tmp_path):
    """The gateway's limit comes from the first run's model; a bigger model submitted to the same
    coordinator would have its arrays refused mid-run, so it is refused up front."""
    from arkfed.config import TrainConfig
    from arkfed.errors import ArkfedError
    from arkfed.federation.coordinator.gateway import run_push_object_limit
    from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
    from federation_fixtures import fast_settings

    config = TrainConfig(sites=["a"], rounds=1, model=TINY)
    prepare_run(tmp_path / "small", config, fast_settings(), resume=False)
    prepare_run(tmp_path / "big", config.model_copy(update={"model": ModelSpec(model="resnet18", img_size=32)}),
                fast_settings(), resume=False)
    assert run_push_object_limit(tmp_path / "small") == push_object_limit(model_state_bytes(TINY))
    assert run_push_object_limit(tmp_path / "big") == FLOWER_CHUNK_BYTES + OBJECT_MARGIN  # resnet18: 47 MB of state
    assert run_push_object_limit(tmp_path / "nothing") == FLOWER_CHUNK_BYTES + OBJECT_MARGIN  # no run: the chunk bound
    coordinator = Coordinator(tmp_path / "small", "127.0.0.1:9", None, [])
    coordinator.push_object_limit = run_push_object_limit(tmp_path / "small")  # as start() sets it
    with pytest.raises(ArkfedError, match="larger than the one this coordinator's gateway was started for"):
        coordinator.submit(tmp_path / "big")
    assert coordinator.runner is None and coordinator.run_dir == (tmp_path / "small").resolve()


# -- real processes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A coordinator (SuperLink, gateway, ServerApp launcher) with one registered site, not yet started."""
    from arkfed.federation.certs import add_site, init_certificates, make_site_key
    from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
    from arkfed.federation.site.node import SiteNode
    from arkfed.ports import free_port
    from federation_fixtures import fast_settings, make_sites, site_name, tiny_config

    root = tmp_path_factory.mktemp("exhaustion")
    sites = make_sites(root)[:1]
    name = site_name(sites[0])
    certs = init_certificates(root / "certs", ["127.0.0.1"])
    key, pub = make_site_key(name, root / "keys")
    add_site(certs, name, pub)
    config = tiny_config(sites, rounds=1)
    prepare_run(root / "run", config, fast_settings(), resume=False)
    coordinator = Coordinator(root / "run", f"127.0.0.1:{free_port()}", certs, config.sites)
    coordinator.site = SiteNode(sites[0], coordinator.address, certs.ca_cert, key, check_data=False)
    coordinator.site_name = name
    try:
        coordinator.start()
        yield coordinator
    finally:
        coordinator.site.stop()
        coordinator.stop()


@pytest.mark.slow
def test_a_1_gib_body_to_every_forwarded_route_is_refused_early_and_the_superlink_does_not_grow(coordinator):
    ca, port = coordinator.certs.ca_cert, coordinator.port
    limit = push_object_limit(model_state_bytes(TINY))
    assert f"--max-push-object {limit}" in " ".join(coordinator.gateway.argv)
    watch = PeakRss({"SuperLink": coordinator.superlink.pid, "gateway": coordinator.gateway.pid})
    watch.start()
    results = {path: oversized_request(port, ca, "POST", path) for path in fleet_paths(supernode_auth=True)}
    results["GET /health"] = oversized_request(port, ca, "GET", "/health")
    with ThreadPoolExecutor(3) as pool:  # three at once, as in the report
        at_once = list(pool.map(lambda _: oversized_request(port, ca, "POST", "/v1/fleet/push-object"), range(3)))
    chunked = oversized_request(port, ca, "POST", "/v1/fleet/push-object", declared=None, budget=limit + (4 << 20))
    memory = watch.stop()
    print(f"\nbody limit: push-object {limit} B (test_resnet), other routes 1 MiB")
    for what, (status, sent, _) in [*results.items(), *(("3 at once", r) for r in at_once), ("chunked push-object", chunked)]:
        print(f"  {what}: {status} after {sent} body bytes sent")
    for name, (before, peak, after) in memory.items():
        print(f"  {name} RSS: {before:.0f} MiB before, {peak:.0f} MiB peak, {after:.0f} MiB after")
    assert {p: r[0] for p, r in results.items()} == {**{p: 413 for p in fleet_paths(True)}, "GET /health": 400}
    assert [r[0] for r in at_once] == [413] * 3
    assert chunked[0] == 413 and limit <= chunked[1] <= limit + (1 << 20)  # cut off at the limit, while streaming
    assert all(r[2].get("connection") == "close" for r in results.values())
    for name, (before, peak, after) in memory.items():
        assert peak - before < 48 and after - before < 32, (name, before, peak, after)
    log = coordinator.gateway.log_text()
    assert "Traceback" not in log and "answered 400 to GET /health" in log and "answered 413 to POST /v1/fleet/push-object" in log


@pytest.mark.slow
def test_tls_1_2_offers_aead_suites_only_and_no_server_header_names_the_software(coordinator):
    ca, port = coordinator.certs.ca_cert, coordinator.port
    cbc = ssl.create_default_context(cafile=str(ca))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE+AES:!AESGCM:!AESCCM:!CHACHA20")  # CBC suites only
    offered = [c for c in cbc.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert offered and all(not c["aead"] for c in offered), offered  # the client really offers CBC suites, and only those
    with pytest.raises((ssl.SSLError, ConnectionError), match="(?i)handshake failure|EOF"):  # the server ends the handshake
        tls_connect(port, ca, context=cbc).close()
    tls12 = ssl.create_default_context(cafile=str(ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    for context in (tls12, None):
        sock = tls_connect(port, ca, context=context)
        name, version, _ = sock.cipher()
        sock.close()
        assert ("GCM" in name or "CHACHA20" in name) and version in ("TLSv1.2", "TLSv1.3"), (name, version)
    for method, path, headers in [("GET", "/health", ""), ("GET", "/docs", ""),
                                  ("POST", "/v1/fleet/get-run", f"Content-Length: {GIB}\r\n")]:
        status, reply = request(port, ca, method, path, headers)
        assert status in (200, 404, 413) and "server" not in reply, (path, reply)


@pytest.mark.slow
def test_500_idle_connections_do_not_stop_a_legitimate_site_from_training_a_visit(coordinator):
    """127.0.0.2 holds 500 connections with unfinished headers (127.0.0.3 five with stalled bodies)
    and re-opens what the gateway drops, while the site on 127.0.0.1 joins and trains."""
    ca, port = coordinator.certs.ca_cert, coordinator.port
    idle = IdleConnections(port, ca, "127.0.0.2", target=500)
    stalled = IdleConnections(port, ca, "127.0.0.3", target=5, stall_body=True, per_tick=1)
    idle.start()
    stalled.start()
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while idle.first_burst is None and time.monotonic() < deadline:
            time.sleep(0.2)
        health = [request(port, ca, "GET", "/health")[0] for _ in range(3)]  # another address: not capped
        coordinator.site.start()
        coordinator.submit()
        coordinator.site.wait_connected(timeout=120)
        status = coordinator.wait(timeout=300)
    finally:
        attack, stall = idle.stop(), stalled.stop()
    seconds = time.monotonic() - started
    print(f"\nidle connections from 127.0.0.2: {attack}\nstalled bodies from 127.0.0.3: {stall}\n"
          f"/health from 127.0.0.1 during the attack: {health}; the site's run: {status.phase} after {seconds:.0f} s")
    assert health == [200, 200, 200]
    assert status.phase == "finished" and set(status.summary["sites"]) == {coordinator.site_name}, status
    assert not status.summary["skipped"], status.summary["skipped"]
    held, refused, burst_seconds = attack["first_burst"]
    assert refused >= 500 - 32 - 5 and held <= 32 + 5  # the per-address cap (32), whatever the timing
    if burst_seconds < 8:  # no header timeout fell inside the burst: exactly the cap got through
        assert held == 32, attack["first_burst"]
    assert attack["dropped_by_server"] >= held and attack["lifetime_s"][2] < 10 + 15, attack  # header timeout 10 s
    if seconds > 45:
        assert stall["dropped_by_server"] >= 1 and 25 < stall["lifetime_s"][0] < 30 + 15, stall  # body timeout 30 s
    log = coordinator.gateway.log_text()
    assert "Traceback" not in log and "request headers incomplete after 10 s" in log and "over the caps" in log


@pytest.mark.slow
def test_the_gateway_log_rotates_within_its_bound_and_never_holds_a_traceback(tmp_path):
    """A gateway started as the coordinator starts it (its output into the same log), with a 16 KiB
    log and two old files, flooded with malformed health checks and refused routes."""
    import sys

    from arkfed.federation.processes import ManagedProcess, flower_env, stop_all, wait_for_port
    from arkfed.ports import free_port

    port, log = free_port(), tmp_path / "logs" / "gateway.log"
    argv = [sys.executable, "-m", "arkfed.federation.coordinator.gateway", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{free_port()}", "--insecure", "--log-file", str(log),
            "--log-max-bytes", "16384", "--log-backups", "2"]
    gateway = ManagedProcess.start("gateway", argv, flower_env(tmp_path / "home"), log)
    codes = []
    try:
        wait_for_port("127.0.0.1", port, gateway, 30)
        deadline = time.monotonic() + 60
        for i in range(400):
            if time.monotonic() > deadline:
                break
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n1234567" if i % 2 else
                             b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                codes.append(read_head(sock)[0])
    finally:
        stop_all([gateway])
    files = sorted(log.parent.iterdir())
    sizes = {f.name: f.stat().st_size for f in files}
    print(f"\n{len(codes)} requests; log files: {sizes}")
    assert set(codes) == {400, 404} and len(codes) >= 200
    assert set(sizes) == {"gateway.log", "gateway.log.1", "gateway.log.2"}
    assert all(size <= 16384 for size in sizes.values()) and sum(sizes.values()) <= 3 * 16384
    text = "".join(f.read_text() for f in files)
    assert "Traceback" not in text and "answered 400 to GET /health" in text
