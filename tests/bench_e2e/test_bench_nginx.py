"""End to end: bench/run.py through a real nginx (least_conn, WebSocket upgrade) to two real workers
(`python -m cosyvoice_tts.server`, embedded tiny model on CPU); what the bench reports must equal what the
workers' /metrics counted.

Needs the `nginx` binary (Debian: apt-get install nginx)."""

import json
import subprocess
import sys
import time

import pytest

from .harness import REPO, Nginx, WorkerProcess, find_nginx, metric, scrape

pytestmark = pytest.mark.e2e

TEXTS = ["Hello there.", "好的，谢谢。", "Good morning!", "马上就到。"]  # short: the CPU model is slow
OUTCOMES = ("finished", "cancelled", "disconnected", "error", "busy", "draining")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    binary = find_nginx()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    tmp = tmp_path_factory.mktemp("bench_e2e")
    workers = [WorkerProcess("wA", tmp, ["--no-warmup"]), WorkerProcess("wB", tmp, ["--no-warmup"])]
    nginx = Nginx(binary, tmp / "nginx", [w.port for w in workers])
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 300  # the first start may build the tiny model
        for w in workers:
            w.wait_ready(deadline)
        nginx.check_config()
        nginx.start()
        nginx.wait_listening(time.monotonic() + 20)
        yield workers, nginx, tmp
    finally:
        nginx.stop()
        for w in workers:
            w.stop()


def _deltas(before: dict, after: dict, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


@pytest.mark.parametrize("mode,load", [("text", ["--parallel", "4", "--rounds", "1"]),
                                       ("stream", ["--parallel", "2", "--rounds", "1", "--token-rate", "40"])])
def test_bench_counts_match_worker_metrics(deployment, mode, load):
    workers, nginx, tmp = deployment
    texts = tmp / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp / f"out-{mode}"
    before = {w.worker_id: scrape(w.base + "/metrics") for w in workers}
    r = subprocess.run([sys.executable, "bench/run.py", "--url", nginx.url, "--mode", mode, *load,
                        "--texts", str(texts), "--request-timeout", "120", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    after = {w.worker_id: scrape(w.base + "/metrics") for w in workers}
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    s = doc["summary"]
    n = int(load[1]) * int(load[3])
    assert s["requests"] == n and s["outcomes"]["ok"] == n, s["errors"]

    # the workers counted exactly the requests the bench saw finish, and nothing else
    finished = {w: _deltas(before[w], after[w], "cosyvoice_tts_requests_total", outcome="finished")
                for w in before}
    assert sum(finished.values()) == n
    for outcome in OUTCOMES[1:]:
        assert sum(_deltas(before[w], after[w], "cosyvoice_tts_requests_total", outcome=outcome)
                   for w in before) == 0, outcome
    assert sum(_deltas(before[w], after[w], "cosyvoice_tts_first_chunk_seconds_count") for w in before) == n

    # audio seconds: the bench's (PCM bytes / 2 / sample_rate) against the workers' counter
    audio = {w: _deltas(before[w], after[w], "cosyvoice_tts_audio_seconds_total") for w in before}
    assert s["audio_s_total"] > 0
    assert s["audio_s_total"] == pytest.approx(sum(audio.values()), abs=1e-3)

    # per-worker balance as the bench reports it (from `started`/`finished`) against each worker
    assert set(s["workers"]) <= set(before)
    for w in before:
        bw = s["workers"].get(w, {"ok": 0, "audio_s": 0.0})
        assert bw["ok"] == finished[w], w
        assert bw["audio_s"] == pytest.approx(audio[w], abs=1e-3), w
    if mode == "text":  # 4 connections over 2 workers with least_conn: both serve
        assert all(finished[w] > 0 for w in before), finished

    for req in doc["requests"]:
        ws_ = req["worker_stats"]
        # the worker's stats (rounded to 1 ms / 1 ms of audio) agree with what the bench measured
        assert req["audio_s"] == pytest.approx(ws_["audio_s"], abs=1.5e-3)
        assert req["first_chunk_ms"] >= ws_["first_chunk_ms"] - 0.1  # the client's span contains the worker's
        assert req["sample_rate"] == 24000 and req["bytes"] == round(req["audio_s"] * 48000)
        assert req["rtf"] > 0 and req["total_ms"] >= req["first_chunk_ms"]
    if mode == "stream":
        assert all(req["chunks"] >= 1 for req in doc["requests"])
    assert (out / "first_chunk_cdf.png").stat().st_size > 5000
    assert (out / "rtf_over_time.png").stat().st_size > 5000
