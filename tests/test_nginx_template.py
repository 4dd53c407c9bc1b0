"""Render the nginx_lb configuration from the example inventory with the role defaults (no hosts needed)
and check it: every card of every host in group tts_gpu, port = base port + GPU index, least_conn + zone,
WebSocket upgrade, timeouts; the cloud protocol (/api-ws/v1/inference) on the WebSocket upstream and
POST /v1/audio/speech on the HTTP API upstream (port = base port + GPU index + 1000, keepalive); `nginx -t`
on the whole rendered configuration when nginx is installed.

Needs ansible-playbook (requirements-deploy.txt, e.g. .venv-deploy/); skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = ROOT / "inventory" / "example"


def _ansible_playbook() -> str | None:
    for cand in (ROOT / ".venv-deploy" / "bin" / "ansible-playbook", shutil.which("ansible-playbook")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


ANSIBLE_PLAYBOOK = _ansible_playbook()
pytestmark = pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-playbook not installed (pip install -r requirements-deploy.txt)")


def render(tmp_path: Path, inventory: Path = INVENTORY, *extra_vars: str) -> tuple[str, str, str]:
    """(nginx.conf, upstream-servers.conf, upstream-http-servers.conf); extra_vars: "name=value" for -e."""
    out = tmp_path / "render"
    out.mkdir()
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "ansible" / "roles"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "atmp"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "rtmp"))
    bindir = str(Path(ANSIBLE_PLAYBOOK).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    r = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ROOT / "ansible" / "playbooks" / "render_nginx.yml"), "-e", f"nginx_lb_render_dir={out}",
         "-e", "ansible_python_interpreter=" + str(Path(bindir) / "python"),
         *(a for v in extra_vars for a in ("-e", v))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tuple((out / name).read_text() for name in ("nginx.conf", "upstream-servers.conf", "upstream-http-servers.conf"))


def block(conf: str, head: str) -> str:
    """The text of the block that starts with the line `head {` (up to its closing brace)."""
    m = re.search(rf"^( *){re.escape(head)} {{\n(.*?)^\1}}$", conf, re.M | re.S)
    assert m, f"no block {head!r}"
    return m.group(2)


WS_BLOCK = ("proxy_pass http://cosyvoice_tts;", "proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
            "proxy_set_header Connection $connection_upgrade;", "proxy_buffering off;", "proxy_read_timeout 3600s;",
            "proxy_send_timeout 3600s;", "proxy_next_upstream error timeout http_502 http_503;")


def servers(upstream: str) -> list[str]:
    return [line.split()[1].rstrip(";") for line in upstream.splitlines() if line.startswith("server ")]


def test_upstream_lists_every_card_of_every_host(tmp_path):
    _, upstream, _ = render(tmp_path)
    expected = [f"10.20.0.11:{9000 + g}" for g in range(8)] + [f"10.20.0.12:{9000 + g}" for g in range(4)]
    assert servers(upstream) == expected
    for line in upstream.splitlines():
        if line.startswith("server "):
            assert "max_fails=3" in line and "fail_timeout=10s" in line


def test_main_config_balances_websockets(tmp_path):
    conf, _, _ = render(tmp_path)
    http = conf[conf.index("http {"):]
    for needle in ("least_conn;", "zone cosyvoice_tts 256k;", "include /etc/nginx/cosyvoice-tts/upstream-servers.conf;",
                   "map $http_upgrade $connection_upgrade", "listen 8080;", "location = /ws",
                   "proxy_set_header Upgrade $http_upgrade;", "proxy_set_header Connection $connection_upgrade;",
                   "proxy_http_version 1.1;", "proxy_buffering off;", "proxy_read_timeout 3600s;",
                   "proxy_next_upstream error timeout http_502 http_503;"):
        assert needle in http, needle
    assert re.search(r"^worker_shutdown_timeout \d+s;$", conf, re.M), "bounded worker_shutdown_timeout in main context"
    # the example enables the per-worker scrape server
    assert "location ~ ^/workers/gpu-node-2/3/(metrics|healthz|readyz)$" in conf
    ws = block(conf, "location = /ws")
    for needle in WS_BLOCK:
        assert needle in ws, needle


def test_cloud_protocol_goes_to_the_websocket_upstream(tmp_path):
    conf, _, _ = render(tmp_path)
    cloud = block(conf, "location ~ ^/api-ws/v1/inference/?$")
    # the same proxying as /ws: upgrade headers, no buffering, the same timeouts and retries
    assert cloud == block(conf, "location = /ws")
    for needle in WS_BLOCK:
        assert needle in cloud, needle


def test_speech_api_goes_to_the_http_upstream(tmp_path):
    conf, _, _ = render(tmp_path)
    up = block(conf, "upstream cosyvoice_tts_http")
    lines = [line.strip() for line in up.splitlines() if line.strip() and not line.strip().startswith("#")]
    # least_conn must come before keepalive (nginx: the balancing method first)
    assert lines == ["least_conn;", "zone cosyvoice_tts_http 256k;",
                     "include /etc/nginx/cosyvoice-tts/upstream-http-servers.conf;", "keepalive 64;",
                     "keepalive_timeout 60s;"], lines
    speech = block(conf, "location ~ ^/v1/audio/speech/?$")
    for needle in ("proxy_pass http://cosyvoice_tts_http;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                   "proxy_buffering off;", "proxy_request_buffering on;", "proxy_read_timeout 300s;",
                   "proxy_send_timeout 300s;", "proxy_next_upstream error timeout http_502 http_503 non_idempotent;",
                   "proxy_next_upstream_tries 3;"):
        assert needle in speech, needle
    assert "Upgrade" not in speech
    # the catch-all 404 comes after the API locations (regex locations are tried in order; `location /` last)
    http = conf[conf.index("http {"):]
    assert http.index("location ~ ^/v1/audio/speech/?$") < http.index("location / {")


def test_http_upstream_lists_every_card_at_the_http_port(tmp_path):
    _, upstream, http_upstream = render(tmp_path)
    expected = [f"10.20.0.11:{10000 + g}" for g in range(8)] + [f"10.20.0.12:{10000 + g}" for g in range(4)]
    assert servers(http_upstream) == expected
    assert [s.split(":")[0] + ":" + str(int(s.split(":")[1]) + 1000) for s in servers(upstream)] == expected
    for line in http_upstream.splitlines():
        if line.startswith("server "):
            assert "max_fails=3" in line and "fail_timeout=10s" in line


def test_http_port_offset_from_the_role_or_the_host(tmp_path):
    inv = tmp_path / "inventory"
    shutil.copytree(INVENTORY, inv)
    # the role's offset applies where a host does not set its own tts_gpu_http_port_offset
    gv = inv / "group_vars" / "tts_gpu.yml"
    gv.write_text(re.sub(r"(?m)^tts_gpu_http_port_offset:.*\n", "", gv.read_text()))
    (inv / "host_vars" / "gpu-node-2.yml").write_text("tts_gpus: [0, 1]\ntts_gpu_http_port_offset: 500\n")
    _, _, http_upstream = render(tmp_path, inv, "nginx_lb_tts_http_port_offset=2000")
    assert servers(http_upstream) == [f"10.20.0.11:{11000 + g}" for g in range(8)] + ["10.20.0.12:9500", "10.20.0.12:9501"]


def test_routes_can_be_turned_off(tmp_path):
    conf, _, _ = render(tmp_path, INVENTORY, "nginx_lb_tts_http_enabled=false", "nginx_lb_dashscope_enabled=false")
    assert "/v1/audio/speech" not in conf and "cosyvoice_tts_http" not in conf and "upstream-http-servers" not in conf
    assert "/api-ws/" not in conf
    assert "location = /ws" in conf


def test_port_is_base_plus_index_for_two_digit_gpus(tmp_path):
    inv = tmp_path / "inventory"
    shutil.copytree(INVENTORY, inv)
    (inv / "host_vars" / "gpu-node-1.yml").write_text("tts_gpus: [0, 12]\ntts_gpu_base_port: 9100\n")
    _, upstream, http_upstream = render(tmp_path, inv)
    assert servers(upstream) == ["10.20.0.11:9100", "10.20.0.11:9112"] + [f"10.20.0.12:{9000 + g}" for g in range(4)]
    assert servers(http_upstream) == ["10.20.0.11:10100", "10.20.0.11:10112"] + [f"10.20.0.12:{10000 + g}" for g in range(4)]


def nginx_t(tmp_path: Path, conf: str, upstream: str, http_upstream: str) -> subprocess.CompletedProcess:
    for name, text in (("upstream-servers.conf", upstream), ("upstream-http-servers.conf", http_upstream)):
        (tmp_path / name).write_text(text)
        conf = conf.replace(f"/etc/nginx/cosyvoice-tts/{name}", str(tmp_path / name))
    assert "/etc/nginx/cosyvoice-tts/" not in conf
    conf = re.sub(r"^(error_log) .*$", rf"\1 {tmp_path}/error.log;", conf, flags=re.M)
    conf = re.sub(r"^(\s*access_log) .*$", rf"\1 {tmp_path}/access.log;", conf, flags=re.M)
    conf = re.sub(r"^pid .*$", f"pid {tmp_path}/nginx.pid;", conf, flags=re.M)
    if os.geteuid() != 0:
        conf = re.sub(r"^user .*$", "", conf, flags=re.M)
    (tmp_path / "nginx.conf").write_text(conf)
    return subprocess.run(["nginx", "-t", "-q", "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_rendered_configuration(tmp_path):
    conf, upstream, http_upstream = render(tmp_path)
    assert "location ~ ^/api-ws/v1/inference/?$" in conf and "location ~ ^/v1/audio/speech/?$" in conf
    r = nginx_t(tmp_path, conf, upstream, http_upstream)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_configuration_without_the_api_routes(tmp_path):
    conf, upstream, http_upstream = render(tmp_path, INVENTORY, "nginx_lb_tts_http_enabled=false",
                                           "nginx_lb_dashscope_enabled=false")
    r = nginx_t(tmp_path, conf, upstream, http_upstream)
    assert r.returncode == 0, r.stderr
