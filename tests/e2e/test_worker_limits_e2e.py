"""A real worker with auth and one session: auth, busy, graceful drain on SIGTERM; and the startup errors."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

TOKEN = "e2e-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def worker(e2e, model_cache):
    w = e2e.Worker(model_cache, "--max-sessions", "1", "--drain-timeout", "60",
                   env={"COSYVOICE_TTS_AUTH_TOKEN": TOKEN}).wait_ready()  # fmt: skip
    yield w
    w.stop()


def arun(coro, timeout=300):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv(ws, timeout=120):
    m = await asyncio.wait_for(ws.recv(), timeout)
    return m if isinstance(m, bytes) else json.loads(m)


async def first_voice(ws):
    await ws.send(json.dumps({"type": "voices"}))
    return (await recv(ws))["voices"][0]


def test_auth(worker, e2e):
    rc, out, err = e2e.run_client("--url", worker.url, "--text", "Hi there.")
    assert rc == 1 and "HTTP 401" in err and "unauthorized" in err

    async def main():
        for headers in (None, {"Authorization": "Bearer nope"}):
            with pytest.raises(InvalidStatus) as ei:
                async with connect(worker.url, additional_headers=headers):
                    pass
            assert ei.value.response.status_code == 401

    arun(main())
    assert worker.http("/healthz")[0] == 200 and worker.http("/metrics")[0] == 200
    assert worker.metric("cosyvoice_tts_engine_steps") >= 0
    rc, d, log = e2e.client_json("--url", worker.url, "--text", "Hi there.", env={"COSYVOICE_TTS_AUTH_TOKEN": TOKEN})
    assert rc == 0 and d["ok"], log
    rc, d, log = e2e.client_json("--url", worker.url, "--token", TOKEN, "--simulate-stream", "--text", "Hi you.")
    assert rc == 0 and d["ok"], log


def test_busy_is_immediate(worker):
    async def main():
        async with connect(worker.url, additional_headers=AUTH) as a, connect(worker.url, additional_headers=AUTH) as b:
            v = await first_voice(a)
            await a.send(json.dumps({"type": "start", "voice": v, "text": "Holding the only session"}))
            assert (await recv(a))["type"] == "started"
            t0 = time.monotonic()
            await b.send(json.dumps({"type": "start", "voice": v, "text": "Hi there.", "end": True}))
            ev = await recv(b)
            assert ev["type"] == "error" and ev["code"] == "busy", ev
            assert time.monotonic() - t0 < 2.0
            await a.send(json.dumps({"type": "cancel"}))
            while not isinstance(m := await recv(a), dict) or m["type"] != "cancelled":
                pass
            await b.send(json.dumps({"type": "start", "voice": v, "text": "Hi there.", "end": True}))
            assert (await recv(b))["type"] == "started"
            while not isinstance(m := await recv(b), dict) or m["type"] != "finished":
                pass

    arun(main())
    assert 'cosyvoice_tts_requests_total{outcome="busy"} 1.0' in worker.http("/metrics")[1]


def test_drain_on_sigterm(worker, e2e):
    """Runs last in this module: the worker exits."""

    async def main():
        async with connect(worker.url, additional_headers=AUTH) as a, connect(worker.url, additional_headers=AUTH) as b:
            v = await first_voice(a)
            await a.send(json.dumps({"type": "start", "voice": v, "text": "In flight while", "request_id": "drain-1"}))
            assert (await recv(a))["type"] == "started"
            worker.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(e2e.wait_for, lambda: worker.http("/readyz") == (503, "draining\n"))
            await b.send(json.dumps({"type": "start", "voice": v, "text": "New.", "end": True}))
            ev = await recv(b)
            assert ev["type"] == "error" and ev["code"] == "draining", ev
            # the in-flight request still takes text and finishes with all its audio
            await a.send(json.dumps({"type": "text", "text": " the worker drains."}))
            await a.send(json.dumps({"type": "end"}))
            audio = bytearray()
            while True:
                m = await recv(a)
                if isinstance(m, bytes):
                    audio += m
                    continue
                if m["type"] == "finished":
                    break
            assert m["request_id"] == "drain-1" and len(audio) / 48000 == pytest.approx(m["stats"]["audio_s"], abs=0.01)
            with pytest.raises(ConnectionClosed) as ei:
                await asyncio.wait_for(a.recv(), 30)
            assert ei.value.rcvd is not None and ei.value.rcvd.code == 1001

    arun(main())
    assert worker.proc.wait(30) == 0, worker.log
    assert "draining" in worker.log and "stopped (all requests finished)" in worker.log


def test_vllm_backend_without_vllm_exits_with_a_clear_error(e2e, model_cache):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    p = subprocess.run([sys.executable, "-m", "cosyvoice_tts.server", "--backend", "vllm", "--port", "0"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert "--backend vllm" in p.stderr and "not installed" in p.stderr
