"""The drop-in protocols against a real worker process (real engine, embedded tiny model), through a real nginx
(started here, non-daemon, on a loopback port, with the location blocks docs/protocol.md gives) when nginx is
installed, else directly:

- the cloud CosyVoice WebSocket protocol with the real ``dashscope`` SDK (``streaming_call`` fragments then
  ``streaming_complete``, plain ``call``, ``streaming_cancel``) and raw WebSocket clients for every error path;
- ``POST /v1/audio/speech`` with the real ``openai`` SDK (streamed pcm, wav, mp3, SSE) and raw HTTP for every
  error path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

dashscope = pytest.importorskip("dashscope", reason="the dashscope SDK is a test dependency (pip install dashscope)")
openai = pytest.importorskip("openai", reason="the openai SDK is a test dependency (pip install openai)")
from dashscope.audio.tts_v2 import AudioFormat, ResultCallback, SpeechSynthesizer  # noqa: E402
from dashscope.common.error import RequestFailure  # noqa: E402

from cosyvoice_tts.server.compat import billed_characters  # noqa: E402

TOKEN = "e2e-protocols-token"
MAX_TEXT = 300
TEXT_TIMEOUT = 2.0
MAX_SESSIONS = 2


# ------------------------------------------------------------------------------------------------------------
# fixtures: one worker, nginx in front of it when available
@pytest.fixture(scope="module")
def worker(e2e, model_cache):
    w = e2e.Worker(model_cache, "--auth-token", TOKEN, "--max-sessions", str(MAX_SESSIONS), "--max-text-chars",
                   str(MAX_TEXT), "--text-timeout", str(TEXT_TIMEOUT), "--worker-id", "e2e-protocols",
                   "--http-port", "0").wait_ready()  # fmt: skip
    m = re.search(r"http api: POST /v1/audio/speech at http://[^ ]+:(\d+)", w.log)
    assert m, w.log
    w.http_port = int(m.group(1))
    yield w
    rc = w.stop()
    assert rc == 0, w.log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The location blocks of docs/protocol.md ("Behind nginx"), with the upstreams pointing at the test worker.
NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream cosyvoice_tts {{ server 127.0.0.1:{ws}; }}
    upstream cosyvoice_tts_http {{ server 127.0.0.1:{hp}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location ~ ^/api-ws/v1/inference/?$ {{
            proxy_pass http://cosyvoice_tts;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
        location ~ ^/v1/audio/speech/?$ {{
            proxy_pass http://cosyvoice_tts_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


@dataclass
class Front:
    via: str
    host: str
    ws_port: int
    http_port: int

    @property
    def ds_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/api-ws/v1/inference"

    @property
    def openai_base(self) -> str:
        return f"http://{self.host}:{self.http_port}/v1"

    @property
    def speech_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/v1/audio/speech"


@pytest.fixture(scope="module")
def front(worker, tmp_path_factory):
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if nginx is None:
        yield Front("direct", "127.0.0.1", worker.port, worker.http_port)
        return
    d = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, ws=worker.port, hp=worker.http_port, port=port))
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError("nginx did not start:\n" + proc.stdout.read().decode(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen") from None
                time.sleep(0.05)
        yield Front("nginx", "127.0.0.1", port, port)
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def request_log_lines(worker, e2e, rid: str) -> list[str]:
    """The worker's log line(s) of a request (its stderr is read by a thread: wait for the line)."""
    e2e.wait_for(lambda: any(f"request id={rid} " in line for line in worker.lines), timeout=10)
    return [line for line in worker.lines if f"request id={rid} " in line]


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setattr(dashscope, "api_key", TOKEN)
    return TOKEN


def test_front_is_reported(front):
    """Which path the tests took (shown with -v -rA): nginx when installed."""
    if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
        assert front.via == "nginx"
    print(f"protocol tests via {front.via} on port {front.ws_port}")


# ------------------------------------------------------------------------------------------------------------
# DashScope SDK
class Collect(ResultCallback):
    def __init__(self) -> None:
        self.audio = bytearray()
        self.events: list[dict] = []
        self.complete = threading.Event()
        self.errors: list[str] = []
        self.first_audio = threading.Event()

    def on_event(self, message: str) -> None:
        self.events.append(json.loads(message))

    def on_data(self, data: bytes) -> None:
        self.audio += data
        self.first_audio.set()

    def on_complete(self) -> None:
        self.complete.set()

    def on_error(self, message) -> None:
        self.errors.append(str(message))
        self.complete.set()


def outputs(events: list[dict], kind: str) -> list[dict]:
    return [e["payload"]["output"] for e in events if e["payload"].get("output", {}).get("type") == kind]


def test_dashscope_streaming_call_fragments_then_complete(front, worker, api_key, e2e):
    cb = Collect()
    syn = SpeechSynthesizer(model="cosyvoice-v2", voice="英文女", format=AudioFormat.PCM_22050HZ_MONO_16BIT,
                            callback=cb, url=front.ds_url)  # fmt: skip
    fragments = ["The", " price", " is", " $29.", "99", " today", ".", " Anything", " else", "?"]
    for f in fragments:
        syn.streaming_call(f)
    syn.streaming_complete(complete_timeout_millis=120_000)
    assert cb.complete.is_set() and not cb.errors
    assert len(cb.audio) > 22050 * 2 * 0.2 and len(cb.audio) % 2 == 0
    begins = outputs(cb.events, "sentence-begin")
    ends = outputs(cb.events, "sentence-end")
    assert [b["original_text"] for b in begins] == ["The price is $29.99 today.", "Anything else?"]
    assert [e["sentence"]["index"] for e in ends] == [0, 1]
    assert outputs(cb.events, "sentence-synthesis"), "a sentence-synthesis event precedes audio frames"
    text = "".join(fragments)
    last = syn.get_response()  # the last JSON message: task-finished
    assert last["header"]["event"] == "task-finished"
    assert last["header"]["task_id"] == syn.get_last_request_id()
    assert last["payload"]["usage"]["characters"] == billed_characters(text) == len(text)
    tid = syn.get_last_request_id()
    lines = request_log_lines(worker, e2e, tid)
    assert len(lines) == 1 and "outcome=finished" in lines[0] and f"chars={len(text)}" in lines[0]


def test_dashscope_call_default_format_is_mp3_22050(front, api_key):
    syn = SpeechSynthesizer(model="cosyvoice-v2", voice="中文女", url=front.ds_url)  # AudioFormat.DEFAULT
    audio = syn.call("你好，欢迎使用。", timeout_millis=120_000)
    assert audio[:2] == b"\xff\xf3" or audio[:3] == b"ID3"  # an MPEG-2 layer III frame (22050 Hz)
    x, sr = sf.read(io.BytesIO(audio), dtype="float32")
    assert sr == 22050 and len(x) > 0.2 * sr and np.abs(x).max() > 0.01
    last = syn.get_response()
    assert last["payload"]["usage"]["characters"] == billed_characters("你好，欢迎使用。") == 14


def pcm_call(front, text: str, fmt=AudioFormat.PCM_24000HZ_MONO_16BIT, **kw) -> bytes:
    return SpeechSynthesizer(model="cosyvoice-v2", voice="中文女", format=fmt, url=front.ds_url, **kw).call(
        text, timeout_millis=120_000
    )


def test_dashscope_volume_sample_rate_rate_and_wav(front, api_key):
    text = "今天天气很好。"
    # the SDK sends seed 0 by default: the same text and voice give the same audio, so options can be compared
    base = np.frombuffer(pcm_call(front, text), "<i2").astype(np.float64)
    loud = np.frombuffer(pcm_call(front, text, volume=100), "<i2").astype(np.float64)
    mute = np.frombuffer(pcm_call(front, text, volume=0), "<i2")
    assert len(base) == len(loud) == len(mute) > 0
    sel = (np.abs(base) > 200) & (np.abs(base) < 12000)
    assert np.median(loud[sel] / base[sel]) == pytest.approx(2.0, abs=0.01)
    assert not mute.any()
    wav = pcm_call(front, text, AudioFormat.WAV_16000HZ_MONO_16BIT)
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav.count(b"RIFF") == 1  # header only at the start
    assert struct.unpack("<I", wav[24:28])[0] == 16000 and wav[36:40] == b"data"
    assert (len(wav) - 44) / 2 / 16000 == pytest.approx(len(base) / 24000, abs=0.02)
    fast = pcm_call(front, text, speech_rate=2.0)
    assert len(fast) / 2 / 24000 < 0.75 * len(base) / 24000


def test_dashscope_streaming_cancel_ends_with_task_finished(front, worker, api_key, e2e):
    cancelled0 = worker.metric('cosyvoice_tts_requests_total{outcome="cancelled"}')
    cb = Collect()
    syn = SpeechSynthesizer(model="cosyvoice-v2", voice="英文女", format=AudioFormat.PCM_16000HZ_MONO_16BIT,
                            callback=cb, url=front.ds_url)  # fmt: skip
    syn.streaming_call("This is a long story that goes on and on. " * 6)
    syn.streaming_flush()
    assert cb.first_audio.wait(120), "no audio before the cancel"
    t0 = time.monotonic()
    syn.streaming_cancel(complete_timeout_millis=10_000)
    assert time.monotonic() - t0 < 9, "the cancel was not answered with task-finished"
    assert cb.complete.is_set() and not cb.errors
    assert syn.get_response()["header"]["event"] == "task-finished"
    assert e2e.wait_for(lambda: worker.metric('cosyvoice_tts_requests_total{outcome="cancelled"}') == cancelled0 + 1)
    assert e2e.wait_for(lambda: worker.metric("cosyvoice_tts_sessions_active") == 0)


def test_dashscope_sdk_with_a_wrong_key_cannot_connect(front, monkeypatch):
    monkeypatch.setattr(dashscope, "api_key", "wrong")
    with pytest.raises((TimeoutError, ConnectionError)):
        syn = SpeechSynthesizer(model="cosyvoice-v2", voice="中文女", url=front.ds_url)
        syn.call("你好。", timeout_millis=20_000)


@pytest.mark.parametrize(
    ("kwargs", "code", "needle"),
    [
        (dict(voice="nobody"), "unknown_voice", "available: 中文女"),
        (dict(voice="中文女", format=AudioFormat.OGG_OPUS_16KHZ_MONO_16KBPS), "unsupported", "format 'opus'"),
        (dict(voice="中文女", pitch_rate=1.5), "unsupported", "pitch"),
        (dict(voice="中文女", synthesis_type=1), "unsupported", "type"),
        (dict(voice="中文女", additional_params={"hot_fix": {"replace": []}}), "unsupported", "hot_fix"),
        (dict(voice="中文女", speech_rate=3.0), "invalid_field", "rate"),
    ],
)
def test_dashscope_sdk_gets_request_failure(front, api_key, kwargs, code, needle):
    with pytest.raises(RequestFailure) as ei:
        SpeechSynthesizer(model="cosyvoice-v2", url=front.ds_url, **kwargs).call("你好。", timeout_millis=20_000)
    assert ei.value.name == "InvalidParameter"
    assert ei.value.message.startswith(code + ":") and needle in ei.value.message


# ------------------------------------------------------------------------------------------------------------
# the DashScope protocol on the wire: error paths, cancel by closing, busy
def arun(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ds_connect(front, path="/api-ws/v1/inference", auth=f"Bearer {TOKEN}"):
    headers = {"Authorization": auth} if auth is not None else None
    return connect(f"ws://{front.host}:{front.ws_port}{path}", additional_headers=headers, max_size=None)


def run_task(task_id: str, text: str | None = None, **params) -> str:
    p = {"voice": "英文女", "format": "pcm", "sample_rate": 16000, "volume": 50, "rate": 1.0, "pitch": 1.0,
         "text_type": "PlainText"}  # fmt: skip
    p.update(params)
    for k in [k for k, v in p.items() if v is None]:
        del p[k]
    return json.dumps({
        "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
        "payload": {"model": "cosyvoice-v2", "task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                    "input": {"text": text} if text is not None else {}, "parameters": p},
    })  # fmt: skip


def cont(task_id: str, text: str | None = None, flush: bool | None = None) -> str:
    inp: dict = {}
    if text is not None:
        inp["text"] = text
    if flush is not None:
        inp["flush"] = flush
    return json.dumps({"header": {"action": "continue-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": inp}})  # fmt: skip


def finish(task_id: str, directive: str | None = None) -> str:
    inp = {"directive": directive} if directive else {}
    return json.dumps({"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": inp}})  # fmt: skip


async def next_event(ws, timeout=60) -> tuple[dict, int]:
    """The next event other than result-generated, and the audio bytes received before it."""
    audio = 0
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, bytes):
            audio += len(m)
            continue
        ev = json.loads(m)
        if ev["header"]["event"] != "result-generated":
            return ev, audio


async def expect(ws, event: str, task_id: str, timeout=60) -> dict:
    ev, _ = await next_event(ws, timeout)
    assert ev["header"]["event"] == event and ev["header"]["task_id"] == task_id, ev
    return ev


def failed(ev: dict, error_code: str, code: str) -> bool:
    h = ev["header"]
    return h["event"] == "task-failed" and h["error_code"] == error_code and h["error_message"].startswith(code + ":")


def disconnected(worker) -> float:
    return worker.metric('cosyvoice_tts_requests_total{outcome="disconnected"}')


def tid() -> str:
    return uuid.uuid4().hex


BAD_RUN_TASKS = [
    (dict(voice=None), "InvalidParameter", "missing_field"),
    (dict(voice="nobody"), "InvalidParameter", "unknown_voice"),
    (dict(format="opus", bit_rate=32), "InvalidParameter", "unsupported"),
    (dict(sample_rate=11025), "InvalidParameter", "invalid_field"),
    (dict(volume=150), "InvalidParameter", "invalid_field"),
    (dict(rate=0.25), "InvalidParameter", "invalid_field"),
    (dict(pitch=0.8), "InvalidParameter", "unsupported"),
    (dict(text_type="SSML"), "InvalidParameter", "unsupported"),
    (dict(seed=-1), "InvalidParameter", "invalid_field"),
    (dict(word_timestamp_enabled=True), "InvalidParameter", "unsupported"),
]


def test_dashscope_bad_messages_each_get_task_failed(front):
    async def main():
        async with ds_connect(front) as ws:
            # frames that are not a task message at all
            for frame, code in (("{", "invalid_json"), ('{"header": {}}', "missing_field"),
                                ('{"header": {"action": "run-task"}}', "missing_field")):  # fmt: skip
                await ws.send(frame)
                ev, _ = await next_event(ws)
                assert failed(ev, "InvalidParameter", code) and ev["header"]["task_id"] == "", ev
            t = tid()
            await ws.send(json.dumps({"header": {"action": "pause-task", "task_id": t}, "payload": {}}))
            assert failed(await expect(ws, "task-failed", t), "InvalidParameter", "unknown_type")
            for msg in (cont, finish):
                t = tid()
                await ws.send(msg(t))
                assert failed(await expect(ws, "task-failed", t), "InvalidParameter", "no_active_request")
            await ws.send(finish(tid(), "cancel"))  # a cancel without a task is ignored: nothing answers it
            for params, ecode, code in BAD_RUN_TASKS:
                t = tid()
                await ws.send(run_task(t, **params))
                ev = await expect(ws, "task-failed", t)
                assert failed(ev, ecode, code), (params, ev)
            bad = json.loads(run_task(tid()))
            for path, value, code in ((("header", "streaming"), "out", "unsupported"),
                                      (("payload", "task_group"), "video", "unsupported"),
                                      (("payload", "function"), "Other", "unsupported"),
                                      (("payload", "model"), None, "missing_field")):  # fmt: skip
                msg = json.loads(json.dumps(bad))
                msg[path[0]][path[1]] = value
                if value is None:
                    del msg[path[0]][path[1]]
                await ws.send(json.dumps(msg))
                assert failed(await expect(ws, "task-failed", bad["header"]["task_id"]), "InvalidParameter", code)
            # the connection still serves a good task after all that
            t = tid()
            await ws.send(run_task(t, "Hello there, friend."))
            await expect(ws, "task-started", t)
            await ws.send(finish(t))
            ev, audio = await next_event(ws)
            assert ev["header"]["event"] == "task-finished" and audio > 0

    arun(main())


def test_dashscope_errors_during_a_task_end_it_with_task_failed(front):
    async def one(setup, error_code, code, *, text="Hello there.", **params):
        async with ds_connect(front) as ws:
            t = tid()
            await ws.send(run_task(t, **params))
            await expect(ws, "task-started", t)
            if text:
                await ws.send(cont(t, text))
            ev = await setup(ws, t)
            assert failed(ev, error_code, code), ev
            # nothing more comes for that task; the connection serves the next one
            t2 = tid()
            await ws.send(run_task(t2))
            ev2, _ = await next_event(ws)
            assert ev2["header"]["event"] == "task-started" and ev2["header"]["task_id"] == t2, ev2
            await ws.send(finish(t2, "cancel"))
            await expect(ws, "task-finished", t2)

    async def wrong_task_id(ws, t):
        await ws.send(cont("someone-else", "more"))
        return (await next_event(ws))[0]

    async def binary(ws, t):
        await ws.send(b"\x00\x01")
        return (await next_event(ws))[0]

    async def too_long(ws, t):
        await ws.send(cont(t, "x" * MAX_TEXT))
        return (await next_event(ws))[0]

    async def nothing_to_say(ws, t):
        await ws.send(cont(t, "```\ncode only\n```"))
        await ws.send(finish(t))
        return (await next_event(ws))[0]

    async def ssml(ws, t):
        await ws.send(cont(t, "<speak>hi</speak>"))
        return (await next_event(ws))[0]

    async def silence(ws, t):
        return (await next_event(ws, timeout=TEXT_TIMEOUT + 30))[0]

    async def bad_directive(ws, t):
        await ws.send(finish(t, "pause"))
        return (await next_event(ws))[0]

    async def main():
        await one(wrong_task_id, "InvalidParameter", "invalid_field")
        await one(binary, "InvalidParameter", "binary_not_allowed")
        await one(too_long, "InvalidParameter", "text_too_long")
        await one(nothing_to_say, "InvalidParameter", "empty_text", text=None)
        await one(ssml, "InvalidParameter", "unsupported", text=None, enable_ssml=True)
        await one(bad_directive, "InvalidParameter", "unsupported")
        t0 = time.monotonic()
        await one(silence, "RequestTimeout", "timeout", text=None)
        assert time.monotonic() - t0 >= TEXT_TIMEOUT

    arun(main())


def test_dashscope_run_task_while_running_and_reuse(front):
    async def main():
        async with ds_connect(front) as ws:
            a, b = tid(), tid()
            await ws.send(run_task(a, "First task."))
            await expect(ws, "task-started", a)
            await ws.send(run_task(b))
            assert failed(await expect(ws, "task-failed", b), "InvalidParameter", "request_active")
            await ws.send(finish(a))  # task a goes on and ends normally
            ev, audio = await next_event(ws)
            assert ev["header"] == {"task_id": a, "event": "task-finished", "attributes": {}} and audio > 0
            assert ev["payload"] == {"output": {}, "usage": {"characters": len("First task.")}}
            await ws.send(run_task(b, "Second task, same connection.", format="wav"))  # old SDKs: text in run-task
            await expect(ws, "task-started", b)
            await ws.send(finish(b))
            first = await asyncio.wait_for(ws.recv(), 60)
            while isinstance(first, str):
                assert json.loads(first)["header"]["event"] == "result-generated"
                first = await asyncio.wait_for(ws.recv(), 60)
            assert first[:4] == b"RIFF"
            await expect(ws, "task-finished", b)

    arun(main())


def test_dashscope_auth_paths_and_close_cancels(front, worker, e2e):
    async def main():
        for auth in (None, "Bearer wrong", f"Basic {TOKEN}"):
            with pytest.raises(InvalidStatus) as ei:
                async with ds_connect(front, auth=auth):
                    pass
            assert ei.value.response.status_code == 401
        disconnected0 = disconnected(worker)
        # lowercase scheme (older SDKs) and the path with a trailing slash
        async with ds_connect(front, path="/api-ws/v1/inference/", auth=f"bearer {TOKEN}") as ws:
            t = tid()
            await ws.send(run_task(t, "A long text for a task that an older client cancels by closing. " * 3))
            await expect(ws, "task-started", t)
            await ws.send(cont(t, flush=True))
            while not isinstance(await asyncio.wait_for(ws.recv(), 60), bytes):
                pass
        # closing the socket mid-task is a cancel: the engine request is freed
        assert await asyncio.to_thread(e2e.wait_for, lambda: disconnected(worker) == disconnected0 + 1)
        assert await asyncio.to_thread(e2e.wait_for, lambda: worker.metric("cosyvoice_tts_sessions_active") == 0)

    arun(main())


def test_busy_worker_refuses_both_protocols(front, worker):
    async def main():
        held = []
        try:
            for _ in range(MAX_SESSIONS):  # tasks with open text hold their session
                ws = await ds_connect(front)
                t = tid()
                await ws.send(run_task(t))
                await expect(ws, "task-started", t)
                held.append((ws, t))
            async with ds_connect(front) as ws:
                t = tid()
                await ws.send(run_task(t))
                assert failed(await expect(ws, "task-failed", t), "Throttling", "busy")
            client = openai.AsyncOpenAI(api_key=TOKEN, base_url=front.openai_base, max_retries=0)
            with pytest.raises(openai.InternalServerError) as ei:
                await client.audio.speech.create(model="tts-1", voice="英文女", input="Hi.", response_format="pcm")
            assert ei.value.status_code == 503 and ei.value.code == "busy"
            assert ei.value.response.headers["retry-after"] == "1"
        finally:
            for ws, t in held:
                await ws.send(finish(t, "cancel"))
                await expect(ws, "task-finished", t)
                await ws.close()

    arun(main())


# ------------------------------------------------------------------------------------------------------------
# OpenAI SDK
@pytest.fixture
def oai(front):
    return openai.OpenAI(api_key=TOKEN, base_url=front.openai_base, max_retries=0, timeout=120)


def test_openai_streamed_pcm(oai, worker, e2e):
    with oai.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="英文女", input="Hello there. This is streamed audio.", response_format="pcm"
    ) as r:
        assert r.headers["content-type"] == "audio/pcm"
        assert r.headers.get("content-length") is None and r.headers.get("transfer-encoding") == "chunked"
        rid = r.headers["x-request-id"]
        audio = b"".join(r.iter_bytes())
    assert len(audio) > 24000 * 2 * 0.2 and len(audio) % 2 == 0
    x = np.frombuffer(audio, "<i2")
    assert np.abs(x).max() > 100
    lines = request_log_lines(worker, e2e, rid)
    assert len(lines) == 1 and "outcome=finished" in lines[0]


def test_openai_wav_mp3_default_and_voice_object(oai):
    wav = oai.audio.speech.create(model="tts-1", voice={"id": "中文女"}, input="你好，世界。",
                                  response_format="wav")  # fmt: skip
    assert wav.response.headers["content-type"] == "audio/wav"
    data = wav.content
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[24:28])[0] == 24000
    mp3 = oai.audio.speech.create(model="tts-1", voice="中文女", input="你好，世界。")  # response_format: mp3
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    x, sr = sf.read(io.BytesIO(mp3.content), dtype="float32")
    assert sr == 24000 and len(x) > 0.2 * sr
    inst = oai.audio.speech.create(model="gpt-4o-mini-tts", voice="中文女", input="你好。", response_format="pcm",
                                   instructions="用开心的语气说", speed=1.5)  # fmt: skip
    assert len(inst.content) > 0


def test_openai_sse(oai):
    with oai.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="英文女", input="Server sent events.", response_format="pcm",
        stream_format="sse",
    ) as r:  # fmt: skip
        assert r.headers["content-type"] == "text/event-stream"
        body = r.read().decode()
    events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]
    assert body.endswith("\n\n") and len(events) >= 2
    deltas, done = events[:-1], events[-1]
    assert all(e["type"] == "speech.audio.delta" for e in deltas)
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(audio) > 0 and len(audio) % 2 == 0
    assert done["type"] == "speech.audio.done"
    u = done["usage"]
    assert u["input_tokens"] > 0 and u["output_tokens"] > 0
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        (dict(voice="alloy"), 400, "unknown_voice", "voice"),
        (dict(response_format="opus"), 400, "unsupported", "response_format"),
        (dict(response_format="aac"), 400, "unsupported", "response_format"),
        (dict(response_format="flac"), 400, "unsupported", "response_format"),
        (dict(speed=3.0), 400, "unsupported", "speed"),
        (dict(speed=5.0), 400, "invalid_field", "speed"),
        (dict(stream_format="chunks"), 400, "invalid_field", "stream_format"),
        (dict(input=""), 400, "empty_text", "input"),
        (dict(input="```\nprint(1)\n```"), 400, "empty_text", None),
        (dict(input="x" * (MAX_TEXT + 1)), 400, "text_too_long", None),
        (dict(extra_body={"sample_rate": 16000}), 400, "unsupported", "sample_rate"),
    ],
)
def test_openai_sdk_errors(oai, kwargs, status, code, param):
    args = dict(model="tts-1", voice="英文女", input="Hello.", response_format="pcm")
    args.update(kwargs)
    with pytest.raises(openai.APIStatusError) as ei:
        oai.audio.speech.create(**args)
    e = ei.value
    assert e.status_code == status and e.code == code and e.param == param, e
    assert e.response.headers["content-type"] == "application/json"


def test_openai_auth(front):
    bad = openai.OpenAI(api_key="wrong", base_url=front.openai_base, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.audio.speech.create(model="tts-1", voice="英文女", input="Hello.", response_format="pcm")
    assert ei.value.status_code == 401 and ei.value.code == "unauthorized"
    body = {"model": "tts-1", "voice": "英文女", "input": "Hi.", "response_format": "pcm"}
    with httpx.Client(timeout=120) as c:
        assert c.post(front.speech_url, json=body).status_code == 401  # no Authorization header
        r = c.post(front.speech_url + "/", json=body, headers={"Authorization": f"bearer {TOKEN}"})  # slash, lowercase
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm" and len(r.content) > 0


def test_openai_raw_http_errors_and_keep_alive(front, worker):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    direct = f"http://127.0.0.1:{worker.http_port}"
    with httpx.Client(timeout=60) as c:
        r = c.post(front.speech_url, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.post(front.speech_url, json=["a"], headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = c.post(front.speech_url, json={"voice": "英文女", "input": "Hi."}, headers=auth)
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "'model' is required (any name: this worker serves one model)", "type": "invalid_request_error",
            "param": "model", "code": "missing_field"}  # fmt: skip
        r = c.get(direct + "/v1/audio/speech", headers=auth)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert c.get(direct + "/v1/models").status_code == 404
        # one keep-alive connection serves requests one after another, errors included
        body = {"model": "tts-1", "voice": "英文女", "input": "Again.", "response_format": "pcm"}
        for _ in range(2):
            r = c.post(direct + "/v1/audio/speech", json=body, headers=auth)
            assert r.status_code == 200 and len(r.content) > 0


def test_openai_client_disconnect_cancels(front, worker, e2e):
    disconnected0 = disconnected(worker)
    body = {"model": "tts-1", "voice": "英文女", "input": "A very long answer that nobody listens to. " * 6,
            "response_format": "pcm"}  # fmt: skip
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", front.speech_url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # the first audio, then hang up
    assert e2e.wait_for(lambda: disconnected(worker) == disconnected0 + 1)
    assert e2e.wait_for(lambda: worker.metric("cosyvoice_tts_sessions_active") == 0)


def test_websocket_port_keeps_its_routes(worker):
    """The WebSocket port keeps answering its GET routes; /v1/audio/speech is on --http-port, not there."""
    assert worker.http("/healthz") == (200, "ok\n")
    assert worker.http("/v1/audio/speech")[0] == 404
