"""A real worker process (real engine, embedded default tiny model) driven by the real client CLI and by raw
WebSocket connections: whole text, fragment stream, interrupt, disconnect, every bad input, metrics and
readiness, 8 concurrent sessions."""

from __future__ import annotations

import asyncio
import json
import re
import wave

import numpy as np
import pytest
from websockets.asyncio.client import connect

MAX_TEXT = 2500
MAX_FRAME = 4096


@pytest.fixture(scope="module")
def worker(e2e, model_cache):
    w = e2e.Worker(model_cache, "--max-sessions", "8", "--max-text-chars", str(MAX_TEXT), "--max-frame-bytes",
                   str(MAX_FRAME), "--worker-id", "e2e-main").wait_ready()  # fmt: skip
    yield w
    rc = w.stop()
    assert rc == 0, w.log


def arun(coro, timeout=300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv(ws, timeout=120):
    m = await asyncio.wait_for(ws.recv(), timeout)
    return m if isinstance(m, bytes) else json.loads(m)


async def collect(ws, timeout=120):
    audio, events = bytearray(), []
    while True:
        m = await recv(ws, timeout)
        if isinstance(m, bytes):
            audio += m
            continue
        events.append(m)
        if m["type"] in ("finished", "cancelled") or (m["type"] == "error" and m.get("request_ended")):
            return bytes(audio), events


async def voices(ws):
    await ws.send(json.dumps({"type": "voices"}))
    return (await recv(ws))["voices"]


def test_health_readiness_and_device_log(worker):
    assert worker.http("/healthz") == (200, "ok\n")
    assert worker.http("/readyz") == (200, "ready\n")
    assert worker.http("/other")[0] == 404
    import torch

    if torch.cuda.is_available():
        assert "using cuda:0" in worker.log and worker.metric("cosyvoice_tts_gpu_memory_bytes") > 0
    else:
        assert "CUDA is not available: running on CPU" in worker.log
        assert worker.metric("cosyvoice_tts_gpu_memory_bytes") == 0
    assert "building the embedded default model" in worker.log or "loading" in worker.log


def test_whole_text_to_wav(worker, e2e, tmp_path):
    out = tmp_path / "whole.wav"
    rc, d, log = e2e.client_json("--url", worker.url, "--text", "Hello there, this is a test.", "--out", str(out),
                                 "--seed", "1")  # fmt: skip
    assert rc == 0, log
    assert d["ok"] and d["outcome"] == "finished" and d["worker"] == "e2e-main"
    assert d["audio_s"] > 0.2 and d["server_stats"]["audio_s"] == pytest.approx(d["audio_s"], abs=0.01)
    assert d["server_stats"]["first_chunk_ms"] > 0 and d["server_stats"]["rtf"] > 0
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == round(d["audio_s"] * 24000)
    # one log line per request
    rid = d["request_id"]
    lines = [line for line in worker.lines if f"request id={rid} " in line]
    assert len(lines) == 1 and "outcome=finished" in lines[0] and "audio_s=" in lines[0] and "rtf=" in lines[0]


def test_fragment_stream(worker, e2e):
    rc, d, log = e2e.client_json("--url", worker.url, "--simulate-stream", "--fragment-interval-ms", "20",
                                 "--text", "Cost $29.99 now. Ok? 好的呀朋友。")  # fmt: skip
    assert rc == 0, log
    assert d["ok"] and d["audio_s"] > 0.2
    assert d["first_audio_ms"] is not None and d["first_audio_ms"] > 0
    assert d["server_stats"]["segments"] == 2  # "Cost $29.99 now." and "Ok? 好的呀朋友。"
    assert d["server_stats"]["chars"] == len("Cost $29.99 now. Ok? 好的呀朋友。")


def test_other_sample_rate_and_wav_format(worker):
    async def main():
        async with connect(worker.url) as ws:
            v = (await voices(ws))[0]
            await ws.send(json.dumps({"type": "start", "voice": v, "text": "Hello there.", "end": True,
                                      "sample_rate": 16000, "format": "wav", "seed": 3}))  # fmt: skip
            st = await recv(ws)
            assert st["sample_rate"] == 16000 and st["format"] == "wav"
            audio, events = await collect(ws)
            assert audio[:4] == b"RIFF" and int.from_bytes(audio[24:28], "little") == 16000
            assert (len(audio) - 44) / 2 / 16000 == pytest.approx(events[-1]["stats"]["audio_s"], abs=0.01)

    arun(main())


def test_interrupt(worker, e2e):
    rc, d, log = e2e.client_json("--url", worker.url, "--test-interrupt", "--cancel-after", "0.05")
    assert rc == 0, log
    assert d["outcome"] == "cancelled" and d["frames_after_cancel"] == 0 and d["follow_up"].startswith("finished")
    assert f"request id={d['request_id']} " in worker.log and "outcome=cancelled" in worker.log


def test_disconnect_mid_stream_cancels(worker, e2e):
    before = worker.metric('cosyvoice_tts_requests_total{outcome="disconnected"}')

    async def main():
        async with connect(worker.url) as ws:
            v = (await voices(ws))[0]
            await ws.send(json.dumps({"type": "start", "voice": v, "text": "A long text. " * 20, "end": True}))
            assert (await recv(ws))["type"] == "started"
            assert isinstance(await recv(ws), bytes)
        # closed with the request running

    arun(main())
    assert e2e.wait_for(
        lambda: worker.metric('cosyvoice_tts_requests_total{outcome="disconnected"}') == before + 1
        and worker.metric("cosyvoice_tts_sessions_active") == 0
        and worker.metric("cosyvoice_tts_engine_active_requests") == 0
    ), worker.http("/metrics")[1]


BAD_INPUTS = [
    ("not json", "invalid_json"),
    ('["start"]', "invalid_json"),
    ('{"text": "hi"}', "missing_field"),
    ('{"type": "run-task"}', "unknown_type"),
    ('{"type": "start"}', "missing_field"),
    ('{"type": "start", "voice": "VOICE", "speed": 3}', "invalid_field"),
    ('{"type": "start", "voice": "VOICE", "format": "opus"}', "invalid_field"),
    ('{"type": "start", "voice": "no-such-voice", "text": "Hi there.", "end": true}', "unknown_voice"),
    ('{"type": "start", "voice": "VOICE", "text": "", "end": true}', "empty_text"),
    ('{"type": "start", "voice": "VOICE", "text": "🎉 ** 🎉", "end": true}', "empty_text"),
    ('{"type": "start", "voice": "VOICE", "text": "%s", "end": true}' % ("a" * (MAX_TEXT + 1)), "text_too_long"),
    ('{"type": "text", "text": "before start"}', "no_active_request"),
    ('{"type": "end"}', "no_active_request"),
    (b"\x00binary", "binary_not_allowed"),
    ('{"type": "text", "text": "%s"}' % ("x" * (MAX_FRAME + 10)), "frame_too_large"),
]


def test_every_bad_input_gets_an_error_and_the_worker_goes_on(worker):
    async def main():
        async with connect(worker.url) as ws:
            v = (await voices(ws))[0]
            for frame, code in BAD_INPUTS:
                if isinstance(frame, str):
                    frame = frame.replace("VOICE", v)
                await ws.send(frame)
                ev = await recv(ws)
                assert ev["type"] == "error" and ev["code"] == code and ev["message"], (frame[:60], ev)
            # inside a request: text after end, empty fragment, over-long streamed text
            await ws.send(json.dumps({"type": "start", "voice": v, "request_id": "bad-1"}))
            assert (await recv(ws))["type"] == "started"
            await ws.send(json.dumps({"type": "text", "text": ""}))
            ev = await recv(ws)
            assert (ev["code"], ev["request_id"], ev["request_ended"]) == ("empty_text", "bad-1", False)
            await ws.send(json.dumps({"type": "start", "voice": v}))
            assert (await recv(ws))["code"] == "request_active"
            await ws.send(json.dumps({"type": "text", "text": "y" * (MAX_TEXT + 1)}))
            _, events = await collect(ws)
            assert (events[-1]["code"], events[-1]["request_ended"]) == ("text_too_long", True)
            await ws.send(json.dumps({"type": "start", "voice": v, "text": "Hello."}))
            await recv(ws)
            await ws.send(json.dumps({"type": "end"}))
            await ws.send(json.dumps({"type": "text", "text": "late"}))
            audio, events = await collect(ws)
            assert [e.get("code") for e in events] == ["text_ended", None] and audio
            # the connection still serves requests
            await ws.send(json.dumps({"type": "start", "voice": v, "text": "Still working.", "end": True}))
            await recv(ws)
            audio, events = await collect(ws)
            assert events[-1]["type"] == "finished" and audio

    arun(main())
    _, body = worker.http("/metrics")
    assert 'cosyvoice_tts_errors_total{code="invalid_json"} 2.0' in body
    assert worker.http("/readyz")[0] == 200


def test_eight_concurrent_sessions_each_get_their_own_audio(worker):
    texts = [f"Hi {i}." for i in range(8)]

    async def one(i, v):
        async with connect(worker.url) as ws:
            await ws.send(json.dumps({"type": "start", "voice": v, "seed": 100 + i, "request_id": f"conc-{i}",
                                      "text": texts[i], "end": True}))  # fmt: skip
            st = await recv(ws)
            assert st["type"] == "started" and st["request_id"] == f"conc-{i}", st
            audio, events = await collect(ws)
            return audio, events[-1]

    async def main():
        async with connect(worker.url) as ws:
            v = (await voices(ws))[0]
        alone = await one(0, v)
        results = await asyncio.gather(*(one(i, v) for i in range(8)))
        return alone, results

    alone, results = arun(main())
    for i, (audio, fin) in enumerate(results):
        assert fin["type"] == "finished" and fin["request_id"] == f"conc-{i}", fin
        assert len(audio) / 2 / 24000 == pytest.approx(fin["stats"]["audio_s"], abs=0.01)
        assert fin["stats"]["chars"] == len(texts[i])
    assert len({a for a, _ in results}) == 8  # no two sessions got the same audio
    # the same request alone and among 7 others gives the same audio (the same seed, text and voice); batched
    # float kernels may round differently, so allow one or two 16-bit steps, nothing audible
    batched, single = np.frombuffer(results[0][0], "<i2"), np.frombuffer(alone[0], "<i2")
    assert batched.shape == single.shape
    assert np.abs(batched.astype(np.int32) - single.astype(np.int32)).max() <= 2
    assert worker.metric("cosyvoice_tts_sessions_active") == 0


def test_metrics(worker):
    status, body = worker.http("/metrics")
    assert status == 200
    for name in ("cosyvoice_tts_sessions_active", "cosyvoice_tts_first_chunk_seconds_bucket",
                 "cosyvoice_tts_audio_seconds_total", "cosyvoice_tts_rtf_bucket", "cosyvoice_tts_gpu_memory_bytes",
                 "cosyvoice_tts_engine_active_requests", "cosyvoice_tts_ready 1.0"):  # fmt: skip
        assert name in body, name
    finished = float(re.search(r'^cosyvoice_tts_requests_total\{outcome="finished"\} (\S+)$', body, re.M).group(1))
    assert finished >= 5
    assert float(re.search(r"^cosyvoice_tts_audio_seconds_total (\S+)$", body, re.M).group(1)) > 1.0
    assert float(re.search(r"^cosyvoice_tts_first_chunk_seconds_count (\S+)$", body, re.M).group(1)) >= finished
