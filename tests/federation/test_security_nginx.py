"""deploy/nginx/arkfed-fleet.conf, run by a real nginx in front of a real coordinator (skipped
where nginx is not installed): a site joins through it, and nothing but the Fleet API gets through."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from arkfed.federation.certs import add_site, init_certificates, make_site_key
from arkfed.federation.coordinator.launcher import Coordinator, prepare_run
from arkfed.federation.site.node import SiteNode
from arkfed.ports import free_port
from federation_fixtures import fast_settings, make_sites, site_name, tiny_config

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "arkfed-fleet.conf"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")]


def _nginx_conf(root: Path, certs: Path, port: int, superlink_port: int) -> Path:
    """The shipped server block, with this test's paths and ports, inside a minimal main config."""
    server = CONF.read_text().replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    server = server.replace("/etc/arkfed/fed-certs", str(certs)).replace("127.0.0.1:9093", f"127.0.0.1:{superlink_port}")
    (root / "arkfed-fleet.conf").write_text(server)
    main = root / "nginx.conf"
    main.write_text(f"""daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
    include {root}/arkfed-fleet.conf;
}}
""")
    return main


def test_the_shipped_nginx_config_forwards_the_fleet_api_only(tmp_path):
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
        base = f"https://127.0.0.1:{public_port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=certs.ca_cert), timeout=10) as client:
            assert client.get(f"{base}/health").status_code == 200
            for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                                 ("POST", "/v1/runtime/get-nodes"), ("GET", "/docs"), ("POST", "/v1/fleet/register-node"),
                                 ("POST", "/v1/fleet/get-run/../../control/list-runs")]:
                reply = client.request(method, base + path, content=b"")
                assert reply.status_code in (403, 404), (method, path, reply.status_code)
            assert client.get(f"{base}/v1/fleet/get-run").status_code == 403  # POST only
            assert client.post(f"{base}/v1/fleet/get-run", content=b"",
                               headers={"content-type": "application/protobuf"}).status_code == 401  # reaches Flower, unsigned
    finally:
        node.stop()
        coordinator.stop()
        nginx.terminate()
        nginx.wait(timeout=10)
    assert "/v1/fleet/activate-node" in (tmp_path / "access.log").read_text()
