"""Verify the deployment on the molecule test hosts (testinfra, ansible backend).

Order matters: the static checks first, then real syntheses through nginx (the worker protocol on /ws,
the cloud protocol on /api-ws/v1/inference, OpenAI-style POST /v1/audio/speech), then scale up/down
(`test_zz_*`), which changes the cluster.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
PROBE = Path(__file__).with_name("tts_probe.py")
LB_PROBE = Path(__file__).with_name("lb_probe.py")

TTS_HOSTS = sorted(RUNNER.get_hosts("tts_gpu"))
LB_HOSTS = sorted(RUNNER.get_hosts("tts_lb"))
VENV = "/opt/cosyvoice-tts/venv"
BASE_PORT = 9000
HTTP_PORT_OFFSET = 1000  # the workers' HTTP API (POST /v1/audio/speech) is on port + 1000


def host(name):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")


def hvars(name):
    return RUNNER.get_variables(name)


def addr(name):
    return hvars(name).get("ansible_host", name)


def lb_url():
    return f"ws://{addr(LB_HOSTS[0])}:8080/ws"


def probe(on, url, mode, arg, timeout=300):
    """Run tts_probe.py on test host `on` with the worker venv; returns (rc, parsed JSON or raw output)."""
    h = host(on)
    h.run(f"cat > /tmp/tts_probe.py <<'EOF'\n{PROBE.read_text()}\nEOF")
    r = h.run(f"timeout {timeout} {VENV}/bin/python /tmp/tts_probe.py {url} {mode} {arg}")
    try:
        return r.rc, json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return r.rc, r.stdout + r.stderr


def upstream_members(http=False):
    """Members of the WebSocket upstream, or (http=True) of the HTTP API upstream."""
    h = host(LB_HOSTS[0])
    name = "upstream-http-servers.conf" if http else "upstream-servers.conf"
    text = h.file(f"/etc/nginx/cosyvoice-tts/{name}").content_string
    return sorted(line.split()[1].rstrip(";") for line in text.splitlines() if line.startswith("server "))


def expected_members(gpus_by_host, http=False):
    offset = HTTP_PORT_OFFSET if http else 0
    return sorted(f"{addr(h)}:{BASE_PORT + g + offset}" for h, gpus in gpus_by_host.items() for g in gpus)


def lb_probe(*args, timeout=300):
    """Run lb_probe.py on the load balancer with its system python3; returns (rc, parsed JSON or raw output)."""
    h = host(LB_HOSTS[0])
    h.run(f"cat > /tmp/lb_probe.py <<'EOF'\n{LB_PROBE.read_text()}\nEOF")
    r = h.run(f"timeout {timeout} python3 /tmp/lb_probe.py " + " ".join(args))
    try:
        return r.rc, json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return r.rc, r.stdout + r.stderr


def inventory_gpus():
    return {h: [int(g) for g in hvars(h).get("tts_gpus", [])] for h in TTS_HOSTS}


# --------------------------------------------------------------------------------------------- static
@pytest.mark.parametrize("name", TTS_HOSTS)
def test_user_and_venv(name):
    h = host(name)
    u = h.user("cosyvoice")
    assert u.exists and u.shell == "/usr/sbin/nologin" and u.home == "/var/lib/cosyvoice-tts"
    assert u.uid < 1000  # system account
    assert h.file(f"{VENV}/bin/python").exists
    assert h.run(f"{VENV}/bin/python -c 'import cosyvoice_tts.server, cosyvoice_tts.client'").rc == 0
    assert h.file("/opt/cosyvoice-tts/wheelhouse").is_directory


@pytest.mark.parametrize("name", TTS_HOSTS)
def test_unit_and_env_files(name):
    h = host(name)
    unit = h.file("/etc/systemd/system/tts@.service")
    assert unit.exists and unit.user == "root" and unit.mode == 0o644
    for needle in ("CUDA_VISIBLE_DEVICES=%i", "Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict",
                   "PrivateTmp=yes", "LimitNOFILE=65536", "User=cosyvoice", "EnvironmentFile=/etc/cosyvoice-tts/tts@%i.env",
                   "--port ${TTS_PORT} --http-port ${TTS_HTTP_PORT} "):
        assert needle in unit.content_string, needle
    assert "PrivateDevices=" not in unit.content_string
    for gpu in inventory_gpus()[name]:
        env = h.file(f"/etc/cosyvoice-tts/tts@{gpu}.env")
        assert env.exists and env.mode == 0o640 and env.group == "cosyvoice"
        assert f"TTS_PORT={BASE_PORT + gpu}\n" in env.content_string
        assert f"TTS_HTTP_PORT={BASE_PORT + gpu + HTTP_PORT_OFFSET}\n" in env.content_string


@pytest.mark.parametrize("name", TTS_HOSTS)
def test_instances_active_listening_ready(name):
    h = host(name)
    for gpu in inventory_gpus()[name]:
        svc = h.service(f"tts@{gpu}")
        assert svc.is_running and svc.is_enabled
        port = BASE_PORT + gpu
        assert h.socket(f"tcp://0.0.0.0:{port}").is_listening
        assert h.socket(f"tcp://0.0.0.0:{port + HTTP_PORT_OFFSET}").is_listening  # POST /v1/audio/speech
        r = h.run(f"{VENV}/bin/python -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/readyz').status)\"")
        assert r.stdout.strip() == "200"
        # the process runs as the dedicated user
        pid = h.run(f"systemctl show -p MainPID --value tts@{gpu}").stdout.strip()
        assert h.run(f"stat -c %U /proc/{pid}").stdout.strip() == "cosyvoice"


def test_nginx_config_lists_every_card_of_every_host():
    h = host(LB_HOSTS[0])
    assert h.service("nginx").is_running and h.service("nginx").is_enabled
    assert h.run("nginx -t").rc == 0
    assert h.socket("tcp://0.0.0.0:8080").is_listening
    conf = h.file("/etc/nginx/nginx.conf").content_string
    for needle in ("least_conn;", "zone cosyvoice_tts", "worker_shutdown_timeout", "map $http_upgrade $connection_upgrade",
                   "proxy_buffering off;", "proxy_read_timeout", "listen 8080;", "location = /ws",
                   "location ~ ^/api-ws/v1/inference/?$", "location ~ ^/v1/audio/speech/?$", "zone cosyvoice_tts_http",
                   "include /etc/nginx/cosyvoice-tts/upstream-http-servers.conf;", "keepalive 64;",
                   'proxy_set_header Connection "";'):
        assert needle in conf, needle
    assert upstream_members() == expected_members(inventory_gpus())
    assert upstream_members(http=True) == expected_members(inventory_gpus(), http=True)


# ------------------------------------------------------------------------------------------ synthesis
def test_synthesis_through_nginx_reaches_workers_on_both_hosts():
    # the client CLI through the load balancer, from a TTS host
    h = host(TTS_HOSTS[0])
    r = h.run(f"timeout 300 {VENV}/bin/python -m cosyvoice_tts.client --url {lb_url()} --text 'Hi.' --out /tmp/lb.wav")
    assert r.rc == 0, r.stdout + r.stderr
    assert h.file("/tmp/lb.wav").size > 44
    # concurrent requests: least_conn spreads them over every worker of both hosts
    n = sum(len(g) for g in inventory_gpus().values()) * 2
    rc, out = probe(TTS_HOSTS[0], lb_url(), "spread", n)
    assert rc == 0, out
    hosts_reached = {w.split("/")[0] for w in out["workers"]}
    assert hosts_reached == set(TTS_HOSTS), out


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/audio/speech/"])
@pytest.mark.parametrize("fmt", ["pcm", "wav"])
def test_openai_speech_through_nginx(fmt, path):
    # a real POST from the load balancer host to nginx; the body streams from a worker's HTTP API port
    rc, out = lb_probe("speech", f"http://127.0.0.1:8080{path}", fmt)
    assert rc == 0, out
    assert isinstance(out, dict) and out["status"] == 200, out
    assert out["content_type"] == {"pcm": "audio/pcm", "wav": "audio/wav"}[fmt], out
    assert out["request_id"], out
    if fmt == "pcm":
        assert out["bytes"] > 0 and out["bytes"] % 2 == 0, out  # s16le samples
    else:
        assert out["head"] == b"RIFF".hex() and out["bytes"] > 44, out


def test_openai_speech_errors_come_through_nginx():
    # the worker's own answers (OpenAI's error shape), not nginx pages
    rc, out = lb_probe("error", "POST", "http://127.0.0.1:8080/v1/audio/speech")
    assert rc == 0 and out["status"] == 400 and out["code"] == "missing_field", out
    rc, out = lb_probe("error", "GET", "http://127.0.0.1:8080/v1/audio/speech")
    assert rc == 0 and out["status"] == 405 and out["allow"] == "POST", out


@pytest.mark.parametrize("path", ["/api-ws/v1/inference", "/api-ws/v1/inference/"])
def test_cloud_protocol_handshake_through_nginx(path):
    rc, out = lb_probe("handshake", f"http://127.0.0.1:8080{path}")
    assert rc == 0, out
    assert isinstance(out, dict) and out["status"] == 101, out
    assert out["upgrade"].lower() == "websocket" and out["accept_ok"], out


def test_cloud_protocol_tasks_through_nginx():
    # the cloud protocol as the dashscope SDK speaks it, two tasks on one connection, from a TTS host
    rc, out = probe(TTS_HOSTS[0], f"ws://{addr(LB_HOSTS[0])}:8080/api-ws/v1/inference", "dashscope", 2)
    assert rc == 0, out
    assert out["ok"] == 2 and all(n > 0 for n in out["audio_bytes"]), out
    assert {"task-started", "result-generated", "task-finished"} <= set(out["events"]), out


# ------------------------------------------------------------------------------------- rolling restart
def run_playbook(name, *args):
    cmd = ["ansible-playbook", "-i", INVENTORY, str(PROJECT / "ansible/playbooks" / name), *args]
    return subprocess.run(cmd, env=dict(os.environ), cwd=PROJECT, capture_output=True, text=True, timeout=900)


def journal_times(name, gpu, since):
    """(start, ready) unix times of the first start of tts@gpu after `since` and of its 'ready' log line."""
    out = host(name).run(f"journalctl -u tts@{gpu} -o short-unix --no-pager --since @{int(since)}").stdout
    start = ready = None
    for line in out.splitlines():
        parts = line.split(None, 1)
        try:
            ts = float(parts[0])
        except (ValueError, IndexError):
            continue
        if start is None and "Started tts@" in line:
            start = ts
        elif start is not None and ready is None and " ready: " in line:
            ready = ts
    return start, ready


def test_y_config_change_restarts_one_instance_of_the_cluster_at_a_time():
    t0 = time.time() - 1
    r = run_playbook("site.yml", "-e", "tts_gpu_max_sessions=5")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    times = []
    for name, gpus in inventory_gpus().items():
        for gpu in gpus:
            assert "--max-sessions 5 " in host(name).file(f"/etc/cosyvoice-tts/tts@{gpu}.env").content_string
            start, ready = journal_times(name, gpu, t0)
            assert start is not None and ready is not None, (name, gpu)
            times.append((start, ready, f"{name}/tts@{gpu}"))
    times.sort()
    # each restart began only after the previous restarted instance was warm again
    for (s1, r1, a), (s2, _r2, b) in zip(times, times[1:]):
        assert r1 <= s2, f"{b} restarted at {s2} before {a} was ready at {r1}"
    assert host(LB_HOSTS[0]).run("nginx -t").rc == 0


# ----------------------------------------------------------------------------------------------- scale
def run_scale(*args):
    return run_playbook("scale.yml", *args)


def test_zz_scale_rejects_invalid_gpus_before_any_change():
    before = upstream_members(), upstream_members(http=True)
    for bad in ("3-1", "0,x", "-1", "0,,1"):
        r = run_scale("-e", f"gpus={bad}", "-l", TTS_HOSTS[-1])
        assert r.returncode != 0, bad
        assert "gpus must be GPU indices" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
        assert "changed=0" in r.stdout and not any(f"changed={i}" in r.stdout for i in range(1, 10))
    assert (upstream_members(), upstream_members(http=True)) == before


def test_zz_scale_up_then_down_while_streams_run():
    target = TTS_HOSTS[-1]
    gpus = inventory_gpus()
    new_gpu = max(gpus[target]) + 1
    up = sorted(gpus[target] + [new_gpu])

    r = run_scale("-e", "gpus=" + ",".join(map(str, up)), "-l", target)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    h = host(target)
    assert h.service(f"tts@{new_gpu}").is_running
    assert upstream_members() == expected_members({**gpus, target: up})
    assert upstream_members(http=True) == expected_members({**gpus, target: up}, http=True)
    assert h.socket(f"tcp://0.0.0.0:{BASE_PORT + new_gpu + HTTP_PORT_OFFSET}").is_listening
    assert "tts_gpus: " + json.dumps(up) in Path(os.path.dirname(INVENTORY), "host_vars", target).read_text()

    # Streams: one directly on the card that goes away, one through nginx (on whichever card); both
    # are fed text for ~12 s and must finish with audio although the card is removed meanwhile.
    other = TTS_HOSTS[0]
    o = host(other)
    o.run(f"cat > /tmp/tts_probe.py <<'EOF'\n{PROBE.read_text()}\nEOF")
    direct = f"ws://{addr(target)}:{BASE_PORT + new_gpu}/ws"
    o.run(f"rm -f /tmp/direct.json /tmp/vialb.json; "
          f"(setsid nohup {VENV}/bin/python /tmp/tts_probe.py {direct} slow 12 > /tmp/direct.json 2>&1 &); "
          f"(setsid nohup {VENV}/bin/python /tmp/tts_probe.py {lb_url()} slow 12 > /tmp/vialb.json 2>&1 &)")
    time.sleep(3)

    t0 = time.monotonic()
    r = run_scale("-e", "gpus=" + ",".join(map(str, gpus[target])), "-l", target)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert not h.service(f"tts@{new_gpu}").is_running
    assert not h.service(f"tts@{new_gpu}").is_enabled
    assert not h.file(f"/etc/cosyvoice-tts/tts@{new_gpu}.env").exists
    assert upstream_members() == expected_members(gpus)
    assert upstream_members(http=True) == expected_members(gpus, http=True)

    for name in ("direct", "vialb"):
        deadline = time.time() + 240
        while time.time() < deadline:
            out = o.run(f"cat /tmp/{name}.json").stdout.strip()
            if out:
                break
            time.sleep(2)
        res = json.loads(out.splitlines()[-1])
        assert res["ok"] and res["outcome"] == "finished" and res["audio_bytes"] > 0, (name, res)
    # the removed card really waited for its stream: scale-down took at least until it finished
    assert took > 5, took
