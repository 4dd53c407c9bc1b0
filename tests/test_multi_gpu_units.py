"""Parts of the multi-GPU bench (bench/multi_gpu/): the nginx_lb render without Ansible (byte-identical to the
role's own render through ansible-playbook, when that is installed), the restart-always supervisor, and the
summary arithmetic (balance, scaling efficiency, failure classification, markdown)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.multi_gpu import analyze, render_nginx  # noqa: E402
PLAYBOOK = render_nginx.find_ansible_playbook()
needs_ansible = pytest.mark.skipif(PLAYBOOK is None, reason="ansible-playbook not installed "
                                   "(pip install -r requirements-deploy.txt): jinja2 render not compared")


# ---- nginx_lb render ------------------------------------------------------------------------------------

def example_inventory() -> dict:
    """inventory/example (hosts.yml + group_vars + host_vars) in render_nginx's inventory shape."""
    d = ROOT / "inventory" / "example"
    inv = yaml.safe_load((d / "hosts.yml").read_text())
    a = inv["all"]
    gv = {f.stem: yaml.safe_load(f.read_text()) or {} for f in (d / "group_vars").glob("*.yml")}
    a["vars"] = {**gv.pop("all", {}), **(a.get("vars") or {})}
    for g, v in gv.items():
        a["children"][g]["vars"] = {**v, **(a["children"][g].get("vars") or {})}
    for f in (d / "host_vars").glob("*.yml"):
        for g in a["children"].values():
            if f.stem in (g.get("hosts") or {}):
                g["hosts"][f.stem] = {**(g["hosts"][f.stem] or {}), **(yaml.safe_load(f.read_text()) or {})}
    return inv


def bench_inventory(tmp_path: Path, **extra) -> dict:
    return render_nginx.inventory([0, 1, 3], 9100, {**render_nginx.lb_vars(tmp_path / "p", 8181), **extra})


@needs_ansible
@pytest.mark.parametrize("which", ["bench", "bench-no-http-scrape", "example"])
def test_jinja2_render_equals_the_roles_render(tmp_path, which):
    if which == "bench":
        inv = bench_inventory(tmp_path)
    elif which == "bench-no-http-scrape":
        inv = bench_inventory(tmp_path, nginx_lb_tts_http_enabled=False, nginx_lb_dashscope_enabled=False,
                              nginx_lb_scrape_enabled=True, nginx_lb_scrape_listen="127.0.0.1:9199",
                              nginx_lb_listen_addresses=["127.0.0.1", "::1"])
    else:
        inv = example_inventory()
    by_ansible = render_nginx.render_ansible(inv, tmp_path / "a", PLAYBOOK)
    by_jinja = render_nginx.render_jinja(inv, tmp_path / "j")
    assert "nginx.conf" in by_ansible and "upstream-servers.conf" in by_ansible
    assert sorted(by_jinja) == sorted(by_ansible)
    for name in by_ansible:
        assert by_jinja[name] == by_ansible[name], name


def test_jinja2_render_and_local_edits(tmp_path):
    etc = tmp_path / "etc"
    info = render_nginx.render(tmp_path / "p", [0, 1, 3], 9100, 8181, etc, renderer="jinja2")
    assert info["renderer"] == "jinja2"
    assert info["upstream_servers"] == ["127.0.0.1:9100", "127.0.0.1:9101", "127.0.0.1:9103"]
    p = tmp_path / "p"
    role_conf = (p / "render" / "nginx.conf").read_text()
    conf = (p / "nginx.conf").read_text()
    # the role's own output keeps the system paths; the local copy differs in exactly those three lines
    assert "pid /run/nginx.pid;" in role_conf and f"pid {p}/nginx.pid;" in conf
    assert f"include {etc}/mime.types;" in conf and f"include {etc}/modules-enabled/*.conf;" in conf
    diff = [(a, b) for a, b in zip(role_conf.splitlines(), conf.splitlines()) if a != b]
    assert len(diff) == 3 and len(role_conf.splitlines()) == len(conf.splitlines())
    for needle in ("listen 127.0.0.1:8181;", "least_conn;", f"include {p}/conf/upstream-servers.conf;",
                   f"access_log {p}/access.log;", f"error_log {p}/error.log warn;", f"proxy_temp_path {p}/tmp/proxy;"):
        assert needle in conf, needle
    assert "/etc/nginx/conf.d" not in conf
    assert (p / "conf" / "upstream-servers.conf").read_text() == (p / "render" / "upstream-servers.conf").read_text()


def test_adapt_refuses_a_changed_template(tmp_path):
    with pytest.raises(RuntimeError, match="template changed"):
        render_nginx.adapt("user x;\n", tmp_path, tmp_path)


# ---- supervisor -----------------------------------------------------------------------------------------

def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_supervisor_restarts_a_killed_child_and_stops_cleanly(tmp_path):
    ev, pidf, log = tmp_path / "ev.jsonl", tmp_path / "child.pid", tmp_path / "child.log"
    sup = subprocess.Popen([sys.executable, str(ROOT / "bench" / "multi_gpu" / "supervise.py"), "--name", "t",
                            "--events", str(ev), "--pidfile", str(pidf), "--log", str(log), "--restart-sec", "0.5",
                            "--", sys.executable, "-c", "import time; print('CHILD-ALIVE', flush=True); time.sleep(600)"])
    try:
        _wait(lambda: log.exists() and log.read_text().count("CHILD-ALIVE") == 1)
        pid1 = int(pidf.read_text())
        t_kill = time.monotonic()
        os.kill(pid1, signal.SIGKILL)
        _wait(lambda: len([e for e in _events(ev) if e["event"] == "start"]) == 2)
        pid2 = int(pidf.read_text())
        assert pid2 != pid1
        _wait(lambda: log.read_text().count("CHILD-ALIVE") == 2)
        os.kill(pid2, 0)  # alive
        tl = analyze.supervisor_timeline(_events(ev), t_kill)
        assert tl["exit"]["signal"] == "SIGKILL" and tl["exit"]["pid"] == pid1
        assert 0.45 <= tl["restart_after_exit_s"] < 2.0
        assert 0 <= tl["exit_seen_after_kill_s"] < 1.0
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid2, 0)
                time.sleep(0.05)
        evs = _events(ev)
        assert evs[-1]["event"] == "stop" and evs[-2]["event"] == "exit" and evs[-2]["pid"] == pid2
    finally:
        if sup.poll() is None:
            sup.kill()


def test_supervisor_restarts_a_child_that_exits_zero(tmp_path):
    ev = tmp_path / "ev.jsonl"
    sup = subprocess.Popen([sys.executable, str(ROOT / "bench" / "multi_gpu" / "supervise.py"), "--name", "t",
                            "--events", str(ev), "--pidfile", str(tmp_path / "p"), "--log", str(tmp_path / "l"),
                            "--restart-sec", "0.1", "--", sys.executable, "-c", "pass"])
    try:
        _wait(lambda: len([e for e in _events(ev) if e["event"] == "exit"]) >= 3)
        assert all(e["returncode"] == 0 for e in _events(ev) if e["event"] == "exit")
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(20)


# ---- arithmetic -----------------------------------------------------------------------------------------

def _row(c, aps, p95, workers=None, failed=0):
    return {"concurrency": c, "audio_s_per_wall_s": aps, "rps": aps / 5, "first_chunk_p95_ms": p95,
            "failed": failed, "workers": workers or {}}


def test_scaling_pairs_levels_and_efficiency():
    single = [_row(1, 5.0, 400), _row(8, 20.0, 900), _row(32, 25.0, 3000)]
    multi = [_row(2, 9.0, 420), _row(16, 36.0, 950), _row(64, 40.0, 3500)]
    sc = analyze.scaling(single, multi, 2)
    assert [(p["single_concurrency"], p["multi_concurrency"]) for p in sc["pairs"]] == [(1, 2), (8, 16), (32, 64)]
    assert [round(p["efficiency"], 3) for p in sc["pairs"]] == [0.9, 0.9, 0.8]
    assert sc["pairs"][0]["ideal_audio_s_per_s"] == 10.0
    assert sc["best_efficiency"] == pytest.approx(40 / 50)
    assert sc["mean_efficiency"] == pytest.approx((0.9 + 0.9 + 0.8) / 3)
    # levels that are not N x the single ones pair by position
    sc = analyze.scaling([_row(1, 5.0, 1), _row(4, 10.0, 1)], [_row(3, 14.0, 1), _row(9, 27.0, 1)], 3)
    assert [(p["single_concurrency"], p["multi_concurrency"]) for p in sc["pairs"]] == [(1, 3), (4, 9)]


def test_balance_per_level_total_idle_and_metrics_check():
    w = lambda r, ok, a: {"requests": r, "ok": ok, "audio_s": a, "share": 0.0}  # noqa: E731
    rows = [_row(2, 1, 1, {"gpu0": w(3, 3, 12.0), "gpu1": w(3, 3, 6.0)}),
            _row(4, 1, 1, {"gpu0": w(5, 4, 20.0), "gpu1": w(5, 5, 20.0)})]
    doc = {"requests": [{"worker": "gpu0", "outcome": "ok"}] * 7 + [{"worker": "gpu1", "outcome": "ok"}] * 8,
           "warmup": [{"worker": "gpu1", "outcome": "ok"}]}
    md = {"gpu0": {"finished": 7.0}, "gpu1": {"finished": 9.0}}
    b = analyze.balance(rows, ["gpu0", "gpu1"], doc, md)
    assert b["per_level"][0]["audio_max_over_min"] == 2.0
    assert b["total"]["gpu0"] == {"requests": 8, "ok": 7, "audio_s": 32.0, "share": 0.5}
    assert b["ok_max_over_min"] == pytest.approx(8 / 7)
    assert b["all_workers_served"] and not b["idle_workers"] and b["metrics_agree"]
    b = analyze.balance(rows, ["gpu0", "gpu1", "gpu2"], doc, dict(md, gpu1={"finished": 8.0}))
    assert b["idle_workers"] == ["gpu2"] and not b["all_workers_served"] and b["ok_max_over_min"] is None
    assert b["metrics_agree"] is False


def test_metrics_parse_and_deltas_across_a_restart():
    text = ('# HELP x\ncosyvoice_tts_requests_total{outcome="finished"} 12.0\n'
            'cosyvoice_tts_requests_total{outcome="busy"} 1.0\ncosyvoice_tts_audio_seconds_total 40.5\n'
            'cosyvoice_tts_sessions_active 3.0\n')
    c = analyze.worker_counters(analyze.parse_metrics(text))
    assert c == {"finished": 12.0, "disconnected": 0.0, "error": 0.0, "busy": 1.0, "audio_s": 40.5, "sessions_active": 3.0}
    d = analyze.counter_deltas({"a": c, "b": c}, {"a": dict(c, finished=15.0, audio_s=50.5), "b": dict(c, finished=2.0, audio_s=4.0)})
    assert d["a"]["finished"] == 3.0 and d["a"]["audio_s"] == 10.0 and not d["a"]["restarted"]
    assert d["b"]["finished"] == 2.0 and d["b"]["restarted"]  # counters began again at 0


def test_failed_requests_classification():
    reqs = [{"outcome": "ok", "worker": "gpu0"}, {"outcome": "ok", "worker": "gpu1"},
            {"outcome": "dropped", "error_code": "connection_closed", "worker": "gpu1", "t_end": 3.0},
            {"outcome": "error", "error_code": "not_ready", "worker": None, "t_end": 5.0},
            {"outcome": "dropped", "error_code": "timeout", "worker": "gpu0", "t_end": 9.0}]
    f = analyze.failed_requests({"requests": reqs}, "gpu1")
    assert (f["requests"], f["ok"], f["failed"]) == (5, 2, 3)
    assert (f["failed_in_flight_at_kill"], f["failed_not_ready"], f["failed_other"]) == (1, 1, 1)
    assert f["failed_by_kind"] == {"dropped:connection_closed": 1, "dropped:timeout": 1, "error:not_ready": 1}
    assert f["ok_by_worker"] == {"gpu0": 1, "gpu1": 1}


def test_markdown_of_a_partial_run():
    s = {"mode": "gpu", "n_workers": 2, "config": {"budget_s": 540}, "workers": [],
         "phases": [{"name": "model", "status": "ran"}, {"name": "failure", "status": "not run", "reason": "budget"}],
         "failure": {"status": "not run", "reason": "budget"}}
    md = analyze.markdown(s)
    assert "## Not run" in md and "failure: not run (budget)" in md


def test_run_sh_help():
    r = subprocess.run(["bash", str(ROOT / "bench" / "multi_gpu" / "run.sh"), "--help"], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0 and "--budget" in r.stdout and "--cpu" in r.stdout
