"""The bench against a test-double worker (tests/bench_e2e/fake_worker.py) on loopback: outcomes, timing,
stalls, load shapes, and the CLI's outputs. The real-worker test is tests/bench_e2e/test_bench_nginx.py."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench_run  # noqa: E402
from bench.client import Connection, RequestOptions, RequestResult, run_request  # noqa: E402
from bench.corpus import TextPicker  # noqa: E402
from bench.load import LoadConfig, LoadRunner  # noqa: E402
from bench_e2e.fake_worker import FakeWorker  # noqa: E402

SHORT = ["Hello there, how are you?", "好的，马上为您处理。", "Your package has arrived today."]


def _run_load(worker, cfg, texts=SHORT, **opt):
    opts = RequestOptions(voice=opt.pop("voice", "default"), **opt)

    async def go():
        return await LoadRunner(worker.url, {}, TextPicker(texts), opts, cfg).run()

    return asyncio.run(go())


def _one(worker, voices, text="Hello there, how are you?", **opt):
    async def go():
        conn = Connection(worker.url)
        out = []
        try:
            for i, v in enumerate(voices):
                res = RequestResult(request_id=f"r{i}", session=0, index=i, level=None, text_chars=len(text),
                                    mode=opt.get("mode", "text"))
                frags = None
                if opt.get("mode") == "stream":
                    from bench.corpus import llm_fragments
                    frags = llm_fragments(text)
                await run_request(conn, text, RequestOptions(voice=v, **opt), res, 0.0, frags)
                out.append(res)
        finally:
            await conn.close()
        return out

    return asyncio.run(go())


def test_text_mode_counts_match_the_worker():
    with FakeWorker(name="fw", audio_per_char=0.02, chunk_s=0.2) as w:
        recs = _run_load(w, LoadConfig(parallel=3, rounds=2))
        assert len(recs) == 6
        assert [r["outcome"] for r in recs] == ["ok"] * 6
        assert w.outcomes["ok"] == 6
        # audio seconds from PCM bytes at the worker's rate, equal to what the worker sent
        assert sum(r["audio_s"] for r in recs) == pytest.approx(w.audio_samples / 24000, abs=1e-9)
        for r in recs:
            assert r["worker"] == "fw" and r["sample_rate"] == 24000
            assert r["audio_s"] == pytest.approx(r["text_chars"] * 0.02, abs=1 / 24000)
            assert r["audio_s"] == pytest.approx(r["worker_stats"]["audio_s"])
            assert r["first_chunk_ms"] >= 50.0          # the worker waits 50 ms before its first chunk
            assert r["first_chunk_ms"] == r["first_chunk_after_end_ms"]  # text mode: one moment
            assert r["total_ms"] >= r["first_chunk_ms"]
            assert r["rtf"] == pytest.approx(r["total_ms"] / 1000 / r["audio_s"])
            assert r["bytes"] == round(r["audio_s"] * 48000)
            assert r["chunks"] == len(r["gaps_ms"]) + 1
        # one connection per session, reused: only the first request of each session connected
        assert sorted(r["connect_ms"] is not None for r in recs) == [False] * 3 + [True] * 3


def test_stalls_are_detected_and_fast_chunks_do_not_stall():
    with FakeWorker(chunk_s=0.2, interval=0.01) as w:
        (fast,) = _one(w, ["default"])
        assert fast.outcome == "ok" and fast.chunks == 3 and fast.stall_count == 0
        # "stall": 0.05 s of audio every 0.25 s, so every gap after the first chunk is a stall
        # with `format: wav` the header of the first frame is not audio
        (wav,) = _one(w, ["default"], extra={"format": "wav"})
        assert wav.outcome == "ok" and wav.audio_s == fast.audio_s and wav.bytes == fast.bytes
        (slow,) = _one(w, ["stall"], text="0123456789")  # 0.2 s of audio: 4 chunks
        assert slow.outcome == "ok" and slow.chunks == 4
        assert slow.stall_count == 3
        assert all(g >= 200.0 for g in slow.gaps_ms)  # 250 ms apart at the worker, minus jitter
        assert 550.0 <= slow.stall_total_ms <= 1000.0  # about 3 x (250 - 50) ms of silence
        assert slow.max_gap_ms == max(slow.gaps_ms)


def test_failure_outcomes_and_reconnect_after_a_drop():
    with FakeWorker(max_sessions=4) as w:
        unknown, internal, dropped, after = _one(w, ["nobody", "internal", "drop", "default"])
        assert (unknown.outcome, unknown.error_code) == ("error", "unknown_voice")
        assert (internal.outcome, internal.error_code) == ("error", "internal")
        assert (dropped.outcome, dropped.error_code) == ("dropped", "connection_closed")
        assert dropped.bytes > 0 and dropped.audio_s == 0.0   # partial audio is not counted as speech
        assert after.outcome == "ok" and after.connect_ms is not None   # a fresh connection
        (hung,) = _one(w, ["hang"], request_timeout=0.5)
        assert (hung.outcome, hung.error_code) == ("dropped", "timeout")
        assert 0.45 <= hung.t_end - hung.t_start < 2.0


def test_busy_when_the_worker_is_full():
    with FakeWorker(max_sessions=1, first_delay=0.6) as w:
        recs = _run_load(w, LoadConfig(parallel=3, rounds=1))
        outcomes = sorted(r["outcome"] for r in recs)
        assert outcomes == ["busy", "busy", "ok"]
        assert w.outcomes["busy"] == 2 and w.outcomes["ok"] == 1


def test_stream_mode_audio_starts_before_end_of_text():
    text = "Speech synthesis has improved a great deal over the last few years, and it keeps improving."
    with FakeWorker(first_delay=0.02) as w:
        (r,) = _one(w, ["default"], text=text, mode="stream", token_rate=50.0)
        assert r.outcome == "ok"
        # about 20 fragments at 50/s take 0.4 s; the first audio comes after the first 8 characters
        assert r.first_chunk_after_end_ms < 0 < r.first_chunk_ms
        assert r.audio_s == pytest.approx(len(text) * 0.02, abs=1 / 24000)


def test_duration_and_rate_runs_stop_by_themselves():
    with FakeWorker() as w:
        recs = _run_load(w, LoadConfig(parallel=2, duration=0.5))
        assert len(recs) >= 2 and all(r["outcome"] == "ok" for r in recs)
        assert max(r["t_start"] for r in recs) < 0.6          # nothing starts after the window (+ slack)
        recs = _run_load(w, LoadConfig(parallel=1, rounds=8, rate=40.0, seed=2))
        assert len(recs) == 8                                  # parallel x rounds arrivals
        kinds = {(r["outcome"], r["error_code"]) for r in recs}
        assert kinds <= {("ok", None), ("dropped", "client_saturated")} and ("ok", None) in kinds


def test_cli_sweep_outputs_and_compare(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SHORT) + "\n", encoding="utf-8")
    with FakeWorker(max_sessions=8) as w:
        out_a = tmp_path / "a"
        rc = bench_run.main(["--url", w.url, "--sweep", "1,2", "--rounds", "2", "--slo-ms", "10000",
                             "--texts", str(texts), "--voice", "default", "--out", str(out_a), "--quiet",
                             "--warmup", "1"])
        assert rc == 0
        out_b = tmp_path / "b"
        rc = bench_run.main(["--url", w.url, "--parallel", "2", "--rounds", "1", "--mode", "stream",
                             "--token-rate", "200", "--texts", str(texts),  # voice: the worker's first
                             "--out", str(out_b), "--quiet"])
        assert rc == 0
    printed = capsys.readouterr().out
    assert "highest concurrency keeping p95 first chunk under 10000 ms: 2" in printed
    doc = json.loads((out_a / "results.json").read_text(encoding="utf-8"))
    assert len(doc["requests"]) == 1 * 2 + 2 * 2 and len(doc["warmup"]) == 1
    assert [lv["concurrency"] for lv in doc["sweep"]["levels"]] == [1, 2]
    assert doc["sweep"]["best_concurrency"] == 2
    assert doc["summary"]["outcomes"]["ok"] == 6
    assert "--sweep" in doc["command"] and doc["environment"]["python"]
    assert doc["config"]["corpus_size"] == 3
    for name in ("first_chunk_cdf.png", "rtf_over_time.png", "sweep.png"):
        data = (out_a / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not (out_b / "sweep.png").exists()
    doc_b = json.loads((out_b / "results.json").read_text(encoding="utf-8"))
    assert doc_b["config"]["voice"] == "default" and doc_b["summary"]["outcomes"]["ok"] == 2
    assert (out_b / "summary.txt").read_text(encoding="utf-8").startswith("bench: stream mode")
    rc = bench_run.main(["--compare", str(out_a / "results.json"), str(out_b / "results.json")])
    assert rc == 0
    cmp_ = capsys.readouterr().out
    row = next(line for line in cmp_.splitlines() if line.startswith("requests"))
    assert row.split()[1:] == ["6", "2", "0.33x"]


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--sweep", "1,x"], ["--slo-ms", "100"], ["--sweep", "1,2", "--rate", "3"],
                 ["--parallel", "0"], ["--start-json", "[1]"]):
        with pytest.raises(SystemExit) as e:
            bench_run.parse_args(argv)
        assert e.value.code == 2
    assert bench_run.main(["--compare", "/nonexistent/a.json", "/nonexistent/b.json"]) == 2


def test_cli_against_nothing_listening(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{s.getsockname()[1]}/ws"
    # no voice given: the lookup fails and says so
    assert bench_run.main(["--url", url, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    # a voice given: every request fails to connect, the run still ends and reports it
    rc = bench_run.main(["--url", url, "--voice", "v", "--parallel", "2", "--rounds", "2", "--backoff", "0",
                         "--out", str(tmp_path / "y"), "--quiet", "--no-plots"])
    assert rc == 1
    doc = json.loads((tmp_path / "y" / "results.json").read_text(encoding="utf-8"))
    assert doc["summary"]["errors"] == {"error:connect": 4}
