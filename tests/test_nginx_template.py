"""Render the nginx_lb configuration from the example inventory with the role defaults (no hosts needed)
and check it: every card of every host in group tts_gpu, port = base port + GPU index, least_conn + zone,
WebSocket upgrade, timeouts; `nginx -t` on the whole rendered configuration when nginx is installed.

Needs ansible-playbook (requirements-deploy.txt, e.g. .venv-deploy/); skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
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


def render(tmp_path: Path, inventory: Path = INVENTORY) -> tuple[str, str]:
    out = tmp_path / "render"
    out.mkdir()
    play = tmp_path / "render.yml"
    play.write_text(textwrap.dedent("""\
        - name: Render nginx_lb offline
          hosts: tts_lb[0]
          connection: local
          gather_facts: false
          tasks:
            - name: Render
              ansible.builtin.include_role:
                name: nginx_lb
                tasks_from: render
        """))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(ROOT / "ansible" / "roles"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "atmp"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "rtmp"))
    bindir = str(Path(ANSIBLE_PLAYBOOK).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    r = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(play), "-e", f"nginx_lb_render_dir={out}",
         "-e", "ansible_python_interpreter=" + str(Path(bindir) / "python")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return (out / "nginx.conf").read_text(), (out / "upstream-servers.conf").read_text()


def servers(upstream: str) -> list[str]:
    return [line.split()[1].rstrip(";") for line in upstream.splitlines() if line.startswith("server ")]


def test_upstream_lists_every_card_of_every_host(tmp_path):
    _, upstream = render(tmp_path)
    expected = [f"10.20.0.11:{9000 + g}" for g in range(8)] + [f"10.20.0.12:{9000 + g}" for g in range(4)]
    assert servers(upstream) == expected
    for line in upstream.splitlines():
        if line.startswith("server "):
            assert "max_fails=3" in line and "fail_timeout=10s" in line


def test_main_config_balances_websockets(tmp_path):
    conf, _ = render(tmp_path)
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


def test_port_is_base_plus_index_for_two_digit_gpus(tmp_path):
    inv = tmp_path / "inventory"
    shutil.copytree(INVENTORY, inv)
    (inv / "host_vars" / "gpu-node-1.yml").write_text("tts_gpus: [0, 12]\ntts_gpu_base_port: 9100\n")
    _, upstream = render(tmp_path, inv)
    assert servers(upstream) == ["10.20.0.11:9100", "10.20.0.11:9112"] + [f"10.20.0.12:{9000 + g}" for g in range(4)]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_accepts_the_rendered_configuration(tmp_path):
    conf, upstream = render(tmp_path)
    (tmp_path / "upstream-servers.conf").write_text(upstream)
    conf = conf.replace("/etc/nginx/cosyvoice-tts/upstream-servers.conf", str(tmp_path / "upstream-servers.conf"))
    conf = re.sub(r"^(error_log) .*$", rf"\1 {tmp_path}/error.log;", conf, flags=re.M)
    conf = re.sub(r"^(\s*access_log) .*$", rf"\1 {tmp_path}/access.log;", conf, flags=re.M)
    conf = re.sub(r"^pid .*$", f"pid {tmp_path}/nginx.pid;", conf, flags=re.M)
    if os.geteuid() != 0:
        conf = re.sub(r"^user .*$", "", conf, flags=re.M)
    (tmp_path / "nginx.conf").write_text(conf)
    r = subprocess.run(["nginx", "-t", "-q", "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
