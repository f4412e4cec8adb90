"""deploy/nginx/arkfed-fleet.conf, run by a real nginx in front of a real coordinator: a site joins
through it, nothing but the Fleet API gets through, and it holds the same limits as arkfed's
gateway (bodies, timeouts, requests per address, TLS suites, no version). ``make test`` installs
nginx when it runs as root with apt-get; elsewhere without nginx this module is skipped (as root a
missing nginx fails it: CI never skips it)."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from arkfed.federation.certs import add_site, init_certificates, make_site_key
from arkfed.federation.coordinator.gateway import fleet_paths
from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
from arkfed.federation.site.node import SiteNode
from arkfed.ports import free_port
from exhaustion import IdleConnections, PeakRss, oversized_request, request, tls_connect
from federation_fixtures import fast_settings, make_sites, site_name, tiny_config
from system_packages import find_program, require_programs

NGINX = find_program("nginx", "/usr/sbin/nginx")
CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "arkfed-fleet.conf"
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nginx_installed():
    require_programs({"nginx": NGINX}, "nginx")
PUSH_OBJECT_LIMIT = 6 << 20  # the file's client_max_body_size for push-object


def _nginx_conf(root: Path, certs: Path, port: int, superlink_port: int) -> Path:
    """The shipped file (zone, upstream, server), with this test's paths and ports, inside a minimal main config."""
    server = CONF.read_text().replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    server = server.replace("/etc/arkfed/fed-certs", str(certs)).replace("127.0.0.1:9093", f"127.0.0.1:{superlink_port}")
    (root / "arkfed-fleet.conf").write_text(server)
    main = root / "nginx.conf"
    main.write_text(f"""daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 2048; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
    include {root}/arkfed-fleet.conf;
}}
""")
    return main


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory):
    """A coordinator, the shipped nginx config in front of it and one site connected through nginx."""
    tmp_path = tmp_path_factory.mktemp("nginx")
    sites = make_sites(tmp_path, images=8)[:1]
    name = site_name(sites[0])
    certs = init_certificates(tmp_path / "fed-certs", ["127.0.0.1"])
    key, pub = make_site_key(name, tmp_path / "site-keys")
    add_site(certs, name, pub)
    run_dir = tmp_path / "run"
    config = tiny_config(sites, rounds=1)
    prepare_run(run_dir, config, fast_settings(), resume=False)
    superlink_port, public_port = free_port(), free_port()
    coordinator = Coordinator(run_dir, f"127.0.0.1:{free_port()}", certs, config.sites, superlink_port=superlink_port)
    conf = _nginx_conf(tmp_path, certs.root, public_port, superlink_port)
    checked = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    nginx = subprocess.Popen([NGINX, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = SiteNode(sites[0], f"127.0.0.1:{public_port}", certs.ca_cert, key, check_data=False)
    try:
        coordinator.start()
        node.start()  # the site reaches the coordinator through nginx only
        node.wait_connected(timeout=90)
        yield coordinator, public_port, tmp_path
    finally:
        node.stop()
        coordinator.stop()
        nginx.terminate()
        nginx.wait(timeout=10)


def test_the_shipped_nginx_config_forwards_the_fleet_api_only(behind_nginx):
    coordinator, public_port, tmp_path = behind_nginx
    base = f"https://127.0.0.1:{public_port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=coordinator.certs.ca_cert), timeout=10) as client:
        assert client.get(f"{base}/health").status_code == 200
        for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                             ("POST", "/v1/runtime/get-nodes"), ("GET", "/docs"), ("POST", "/v1/fleet/register-node"),
                             ("POST", "/v1/fleet/get-run/../../control/list-runs")]:
            reply = client.request(method, base + path, content=b"")
            assert reply.status_code in (403, 404), (method, path, reply.status_code)
        assert client.get(f"{base}/v1/fleet/get-run").status_code == 403  # POST only
        assert client.get(f"{base}/v1/fleet/push-object").status_code == 403
        assert client.post(f"{base}/v1/fleet/get-run", content=b"",
                           headers={"content-type": "application/protobuf"}).status_code == 401  # reaches Flower, unsigned
    assert "/v1/fleet/activate-node" in (tmp_path / "access.log").read_text()


def test_nginx_refuses_a_1_gib_body_early_and_the_superlink_does_not_grow(behind_nginx):
    coordinator, port, _ = behind_nginx
    ca = coordinator.certs.ca_cert
    watch = PeakRss({"SuperLink": coordinator.superlink.pid})
    watch.start()
    results = {path: oversized_request(port, ca, "POST", path) for path in fleet_paths(supernode_auth=True)}
    results["GET /health"] = oversized_request(port, ca, "GET", "/health")
    chunked = oversized_request(port, ca, "POST", "/v1/fleet/push-object", declared=None, budget=PUSH_OBJECT_LIMIT + (4 << 20))
    before, peak, after = watch.stop()["SuperLink"]
    print(f"\nnginx, 1 GiB claimed: { {p: r[:2] for p, r in results.items()} }; chunked push-object: {chunked[:2]}\n"
          f"SuperLink RSS: {before:.0f} MiB before, {peak:.0f} MiB peak, {after:.0f} MiB after")
    assert {p: r[0] for p, r in results.items()} == {**{p: 413 for p in fleet_paths(True)}, "GET /health": 413}
    assert request(port, ca, "GET", "/health", "Content-Length: 5\r\n")[0] == 400  # a health check carries no body
    assert chunked[0] == 413 and chunked[1] <= PUSH_OBJECT_LIMIT + (1 << 20)
    assert peak - before < 48 and after - before < 32, (before, peak, after)


def test_nginx_offers_aead_suites_only_and_names_no_version(behind_nginx):
    coordinator, port, _ = behind_nginx
    ca = coordinator.certs.ca_cert
    cbc = ssl.create_default_context(cafile=str(ca))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE+AES:!AESGCM:!AESCCM:!CHACHA20")  # CBC suites only
    assert all(not c["aead"] for c in cbc.get_ciphers() if c["protocol"] == "TLSv1.2")
    with pytest.raises((ssl.SSLError, ConnectionError), match="(?i)handshake failure|EOF"):
        tls_connect(port, ca, context=cbc).close()
    tls12 = ssl.create_default_context(cafile=str(ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    sock = tls_connect(port, ca, context=tls12)
    assert "GCM" in sock.cipher()[0] or "CHACHA20" in sock.cipher()[0], sock.cipher()
    sock.close()
    for method, path in [("GET", "/health"), ("GET", "/docs"), ("POST", "/v1/fleet/get-run")]:
        status, headers = request(port, ca, method, path, "Content-Length: 0\r\n" if method == "POST" else "")
        assert status and headers.get("server") == "nginx", (path, status, headers)  # no version, not uvicorn


def test_nginx_drops_unfinished_headers_and_caps_requests_per_address(behind_nginx):
    """500 connections with unfinished headers from 127.0.0.2 are dropped after client_header_timeout
    while 127.0.0.1 is served; 40 stalled bodies from 127.0.0.3: 32 in progress, the rest 429."""
    coordinator, port, _ = behind_nginx
    ca = coordinator.certs.ca_cert
    idle = IdleConnections(port, ca, "127.0.0.2", target=500, seconds=40, per_tick=0)  # no re-opening: watch them go
    idle.start()
    deadline = time.monotonic() + 60
    while idle.first_burst is None and time.monotonic() < deadline:
        time.sleep(0.2)
    health = [request(port, ca, "GET", "/health")[0] for _ in range(3)]
    idle.join(timeout=60)
    attack = idle.stop()
    stalled = IdleConnections(port, ca, "127.0.0.3", target=40, stall_body=True, seconds=0)
    stalled.start()
    stalled.join(timeout=60)
    time.sleep(1)
    stalled.reap()
    held = len(stalled.held)
    over_cap = [request(port, ca, "POST", "/v1/fleet/get-run", "Content-Length: 0\r\n", source="127.0.0.3")[0] for _ in range(2)]
    legit = request(port, ca, "GET", "/health")[0]
    stalled.stop()
    print(f"\nnginx, idle connections from 127.0.0.2: {attack}; /health from 127.0.0.1 meanwhile: {health}\n"
          f"stalled bodies from 127.0.0.3: {held} held, {len(stalled.lifetimes)} answered at once; "
          f"another request from 127.0.0.3: {over_cap}; from 127.0.0.1: {legit}")
    assert health == [200, 200, 200] and legit == 200
    assert attack["first_burst"][0] == 500 and attack["dropped_by_server"] == 500  # all taken, all dropped
    assert 9 < attack["lifetime_s"][0] and attack["lifetime_s"][2] < 10 + 5, attack  # client_header_timeout 10s
    assert held == 32 and over_cap == [429, 429]  # limit_conn 32 per address
