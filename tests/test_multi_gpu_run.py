"""End to end: bench/multi_gpu/run.sh in CPU mode (2 workers, tiny model, short levels): nginx unpacked from
Debian's package files, configuration rendered by the nginx_lb role, supervised workers, a one-worker and a
two-worker sweep through nginx, then one worker killed with SIGKILL mid-benchmark. The summary must hold the
balance, the scaling efficiency and the kill/restart numbers, and both workers must have served requests.

Needs the nginx .deb files: carry/nginx-debs (bench/multi_gpu/fetch_nginx.sh), else they are fetched with
apt-get download into a temporary folder; skipped, saying so, when that fails."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.multi_gpu import render_nginx  # noqa: E402

pytestmark = pytest.mark.e2e


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports() -> tuple[int, int]:
    """A base port whose worker ports (base, base + 1) and HTTP API ports (+1000) are free, and an LB port."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000)
        lb = base + 500
        if all(_free(p) for p in (base, base + 1, base + 1000, base + 1001, lb)):
            return base, lb
    pytest.skip("no free ports")


@pytest.fixture(scope="module")
def nginx_debs(tmp_path_factory) -> Path:
    carried = ROOT / "carry" / "nginx-debs"
    if list(carried.glob("nginx_*.deb")):
        return carried
    dest = tmp_path_factory.mktemp("nginx-debs")
    try:
        r = subprocess.run(["bash", str(ROOT / "bench" / "multi_gpu" / "fetch_nginx.sh"), str(dest)],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not fetch the nginx .deb files: {e}")
    if r.returncode != 0 or not list(dest.glob("nginx_*.deb")):
        pytest.skip(f"could not fetch the nginx .deb files (bench/multi_gpu/fetch_nginx.sh exit {r.returncode}): "
                    f"{r.stderr[-500:]}")
    return dest


def _run(tmp_path: Path, debs: Path, *args: str, timeout: float = 480) -> tuple[subprocess.CompletedProcess, Path]:
    base, lb = _ports()
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, NGINX_DEBS=str(debs))
    r = subprocess.run(["bash", str(ROOT / "bench" / "multi_gpu" / "run.sh"), "--cpu", "2", "--out", str(out),
                        "--base-port", str(base), "--lb-port", str(lb), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, out


def test_cpu_run_reports_balance_scaling_and_restart(tmp_path, nginx_debs):
    r, out = _run(tmp_path, nginx_debs, "--export", str(tmp_path / "export"), "--model-dir", str(tmp_path / "model"),
                  "--sweep", "1,2", "--duration", "3", "--warmup", "1", "--kill-after", "3", "--restart-sec", "1",
                  "--recovery-window", "10", "--request-timeout", "30", "--budget", "300", "--no-plots",
                  "--compare-renderers")
    log = r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0, log
    s = json.loads((out / "summary.json").read_text())
    assert {p["name"]: p["status"] for p in s["phases"]} == {
        ph: "ran" for ph in ("model", "workers", "nginx", "single_sweep", "multi_sweep", "failure")}, log
    assert "NOT RUN: nothing" in r.stdout
    assert s["mode"] == "cpu" and s["n_workers"] == 2
    names = [w["name"] for w in s["workers"]]
    assert names == ["cpu0", "cpu1"]
    base = s["workers"][0]["port"]

    # nginx: from the unpacked packages, configured by the role's templates
    ng = s["nginx"]
    assert ng["source"].startswith("debs:") and "nginx/1." in ng["version"]
    assert ng["multi_upstream"] == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    assert ng["single_upstream"] == [f"127.0.0.1:{base}"]
    if render_nginx.find_ansible_playbook():
        assert ng["renderer"] == "ansible" and ng["renders_equal"] is True
    else:
        assert ng["renderer"] == "jinja2"

    # per-GPU balance: both workers served, and the bench agrees with the workers' own counters
    b = s["balance"]
    assert b["all_workers_served"], b
    assert all(b["total"][w]["ok"] > 0 and b["total"][w]["audio_s"] > 0 for w in names)
    assert b["metrics_agree"] is True, b
    assert [lv["concurrency"] for lv in b["per_level"]] == [2, 4]

    # scaling efficiency against 2 x the one-worker sweep, p95 first chunk per level
    sc = s["scaling"]
    assert [(p["single_concurrency"], p["multi_concurrency"]) for p in sc["pairs"]] == [(1, 2), (2, 4)]
    for p in sc["pairs"]:
        assert p["efficiency"] > 0 and p["ideal_audio_s_per_s"] == pytest.approx(2 * p["single_audio_s_per_s"])
        assert p["single_first_chunk_p95_ms"] > 0 and p["multi_first_chunk_p95_ms"] > 0
    assert sc["best_efficiency"] > 0
    assert set(s["p95_first_chunk_ms"]["multi"]) == {"2", "4"}

    # the kill and the restart
    f = s["failure"]
    assert f["status"] == "ran" and f["victim"] == "cpu1"
    fr = f["requests"]
    assert fr["requests"] > 0 and fr["failed"] == fr["requests"] - fr["ok"]
    assert fr["failed"] == fr["failed_in_flight_at_kill"] + fr["failed_not_ready"] + fr["failed_other"]
    tl = f["supervisor"]
    assert tl["exit"]["signal"] == "SIGKILL" and tl["exit"]["pid"] == f["victim_pid"]
    assert tl["restart"]["pid"] != f["victim_pid"] and tl["starts"] >= 2
    assert 0.9 <= tl["restart_after_exit_s"] < 5
    assert f["recovery_s"] is not None and f["recovery_s"] > tl["restart_after_kill_s"] > 0
    assert f["start_to_ready_s"] > 0

    # outputs
    md = (out / "summary.md").read_text()
    for heading in ("## Scaling", "## Per-GPU balance", "## Failure run", "## Not run"):
        assert heading in md
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == ["multi_gpu_out.tar.gz", "summary.json", "summary.md"]
    for d in ("single_sweep", "multi_sweep", "failure"):
        assert (out / d / "results.json").exists()
    # every process the run started is gone: nothing listens on the worker ports, no recorded pid lives
    for port in (base, base + 1, s["config"]["lb_port"]):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for ev in (out / "workers").glob("*.events.jsonl"):
        for e in map(json.loads, ev.read_text().splitlines()):
            if e["event"] == "start":
                assert not Path(f"/proc/{e['pid']}").exists() or "zombie" in Path(f"/proc/{e['pid']}/status").read_text()


def test_a_phase_that_does_not_fit_the_budget_is_reported_not_run(tmp_path, nginx_debs):
    r, out = _run(tmp_path, nginx_debs, "--model-dir", str(tmp_path / "no-model-yet"), "--budget", "25",
                  "--reserve", "20", timeout=120)
    assert r.returncode != 0
    s = json.loads((out / "summary.json").read_text())
    st = {p["name"]: p for p in s["phases"]}
    assert st["model"]["status"] == "not run" and "budget" in st["model"]["reason"]
    assert all(st[ph]["status"] == "not run" for ph in ("workers", "nginx", "single_sweep", "multi_sweep", "failure"))
    assert "NOT RUN: model (not run: budget" in r.stdout
