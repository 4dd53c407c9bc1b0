"""The worker's WebSocket protocol, in process, against a TEST-ONLY fake engine (no model).

The fake implements the engine API of docs/architecture.md (submit / push_text / end_text / cancel / async
chunks / summary) with a thread per request, like the real engine's loop thread, so the server's concurrency
(cancel vs. audio in flight, disconnects, admission, drain) is exercised without model compute. The real
worker process with the real engine is covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cosyvoice_tts.server.app import WorkerServer
from cosyvoice_tts.server.config import ServerConfig

SR = 24000


# ----------------------------------------------------------------------------------------------------------
# test double
class FakeEngineError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class FakeParams:
    def __init__(self, voice, mode="sft", instruct_text=None, speed=1.0, seed=None, stream=True):
        self.voice, self.mode, self.instruct_text, self.speed, self.seed, self.stream = (
            voice, mode, instruct_text, speed, seed, stream)  # fmt: skip


class FakeRequest:
    """Audio: per text segment, ``chunks_per_segment`` chunks of 0.1 s of a sine whose frequency is set by the
    seed (so each request's audio is recognisable), one every ``interval`` s."""

    def __init__(self, engine: "FakeEngine", params: FakeParams, text: str | None):
        self.engine, self.params = engine, params
        self.pushed: list[str] = []
        self.ended = False
        self.cancelled = False
        self.sent_chunks = 0
        self._inbox: deque = deque()
        self._out: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list = []
        self.freq = 200.0 + 40.0 * ((params.seed or 0) % 20)
        if text is not None:
            self._inbox.append(("text", text))
            self._inbox.append(("end", None))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # caller side
    def push_text(self, text: str) -> None:
        if self.ended:
            raise FakeEngineError("invalid_request", "text after end")
        self.pushed.append(text)
        with self._cond:
            self._inbox.append(("text", text))
            self._cond.notify_all()

    def end_text(self) -> None:
        self.ended = True
        with self._cond:
            self._inbox.append(("end", None))
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    @property
    def summary(self) -> dict:
        return {"rtf": 0.25, "text_tokens": sum(len(t) for t in self.pushed), "speech_tokens": 7,
                "first_chunk_ms": 12.0}  # fmt: skip

    async def chunks(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                item = self._out.popleft() if self._out else None
                if item is None:
                    ev = asyncio.Event()
                    self._waiters.append((loop, ev))
            if item is None:
                await ev.wait()
                continue
            kind, value = item
            if kind == "audio":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    # engine side
    def _put(self, item) -> None:
        with self._cond:
            self._out.append(item)
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    def _run(self) -> None:
        eng = self.engine
        t = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._inbox or self.cancelled, timeout=30)
                    if self.cancelled:
                        self._put(("end", "cancelled"))
                        return
                    if not self._inbox:
                        continue
                    kind, value = self._inbox.popleft()
                if kind == "end":
                    self._put(("end", "ok"))
                    return
                if self.params.voice == "fail":
                    self._put(("error", FakeEngineError("generation_failed", "the fake engine failed")))
                    return
                for _ in range(eng.chunks_per_segment):
                    with self._cond:
                        if self._cond.wait_for(lambda: self.cancelled, timeout=eng.interval):
                            self._put(("end", "cancelled"))
                            return
                    n = int(0.1 * SR)
                    x = 0.3 * np.sin(2 * np.pi * self.freq * (np.arange(n) + t) / SR).astype(np.float32)
                    t += n
                    self.sent_chunks += 1
                    self._put(("audio", x))
        finally:
            eng._done(self)


class FakeEngine:
    sample_rate = SR

    def __init__(self, voices=("alice", "bob", "fail"), max_sessions=64, interval=0.01, chunks_per_segment=2):
        self._voices = list(voices)
        self.max_sessions = max_sessions
        self.interval = interval
        self.chunks_per_segment = chunks_per_segment
        self.requests: list[FakeRequest] = []
        self.active = 0
        self._lock = threading.Lock()

    def voices(self):
        return list(self._voices)

    def submit(self, params, text=None):
        if params.voice not in self._voices:
            raise FakeEngineError("unknown_voice", f"unknown voice {params.voice!r}")
        with self._lock:
            if self.active >= self.max_sessions:
                raise FakeEngineError("capacity", "full")
            self.active += 1
        req = FakeRequest(self, params, text)
        self.requests.append(req)
        return req

    def _done(self, req):
        with self._lock:
            self.active -= 1

    def stats(self):
        return {"active_requests": self.active, "steps": 3}


# ----------------------------------------------------------------------------------------------------------
# harness
def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Harness:
    def __init__(self, engine=None, **cfg):
        cfg.setdefault("port", 0)
        cfg.setdefault("worker_id", "w-test")
        self.cfg = ServerConfig(**cfg)
        self.engine = engine or FakeEngine()
        self.server = WorkerServer(self.cfg, params_cls=FakeParams)

    async def __aenter__(self):
        await self.server.start()
        self.server.attach_engine(self.engine)
        self.server.set_ready()
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.server.port}/ws"

    def connect(self, headers=None):
        return connect(self.url, additional_headers=headers, compression=None, max_size=None)

    async def http(self, path):
        def get():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}{path}", timeout=5) as r:
                    return r.status, r.read().decode(), dict(r.headers)
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(), dict(e.headers)

        return await asyncio.to_thread(get)


async def send(ws, **msg):
    await ws.send(json.dumps(msg))


async def recv(ws, timeout=10):
    m = await asyncio.wait_for(ws.recv(), timeout)
    return m if isinstance(m, bytes) else json.loads(m)


async def collect(ws, timeout=10):
    """Audio and events until finished / cancelled / a request-ending error."""
    audio, events = bytearray(), []
    while True:
        m = await recv(ws, timeout)
        if isinstance(m, bytes):
            audio += m
            continue
        events.append(m)
        if m["type"] in ("finished", "cancelled") or (m["type"] == "error" and m.get("request_ended")):
            return bytes(audio), events


def dominant_freq(pcm: bytes, sr=SR) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    spec = np.abs(np.fft.rfft(x))
    return float(np.argmax(spec) * sr / len(x))


# ----------------------------------------------------------------------------------------------------------
def test_whole_text_request_and_stats():
    async def main():
        async with Harness() as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", text="Hello there. How are you?", end=True, seed=3,
                       request_id="r-1")
            started = await recv(ws)
            assert started == {"type": "started", "request_id": "r-1", "sample_rate": SR, "format": "pcm",
                               "worker": "w-test"}
            audio, events = await collect(ws)
            fin = events[-1]
            assert fin["type"] == "finished" and fin["request_id"] == "r-1"
            st = fin["stats"]
            # whole text: one submit with the cleaned text, 2 chunks of 0.1 s
            assert len(audio) == 2 * 2 * int(0.1 * SR)
            assert st["audio_s"] == pytest.approx(0.2) and st["chars"] == len("Hello there. How are you?")
            assert st["rtf"] == 0.25 and st["worker"] == "w-test" and st["first_chunk_ms"] >= 0
            assert abs(dominant_freq(audio) - 320.0) < 15
            # the connection serves another request
            await send(ws, type="start", voice="bob", text="Again.", end=True)
            s2 = await recv(ws)
            assert s2["type"] == "started" and len(s2["request_id"]) == 32
            audio2, ev2 = await collect(ws)
            assert ev2[-1]["type"] == "finished" and len(audio2) > 0
            assert h.server.admission.active == 0

    run(main())


def test_fragment_stream_is_segmented_into_sentences():
    async def main():
        eng = FakeEngine()
        async with Harness(eng) as h, h.connect() as ws:
            await send(ws, type="start", voice="alice")
            assert (await recv(ws))["type"] == "started"
            text = "**Note:** the price is $29.99 today. 😀 Visit example.com now! And"
            for i in range(0, len(text), 3):
                await send(ws, type="text", text=text[i:i + 3])
            await send(ws, type="text", text=" then")
            await send(ws, type="end")
            audio, events = await collect(ws)
            assert events[-1]["type"] == "finished"
            req = eng.requests[-1]
            assert req.pushed == ["Note: the price is $29.99 today.", "Visit example.com now!", "And then"]
            assert events[-1]["stats"]["segments"] == 3
            assert len(audio) == 3 * 2 * 2 * int(0.1 * SR)

    run(main())


def test_flush_pushes_buffered_text():
    async def main():
        eng = FakeEngine()
        async with Harness(eng) as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", text="An unfinished thought")
            assert (await recv(ws))["type"] == "started"
            await send(ws, type="flush")
            await asyncio.sleep(0.05)
            assert eng.requests[-1].pushed == ["An unfinished thought"]
            await send(ws, type="text", text=" and more")
            await send(ws, type="end")
            _, events = await collect(ws)
            assert eng.requests[-1].pushed == ["An unfinished thought", "and more"]
            assert events[-1]["type"] == "finished"

    run(main())


def test_cancel_stops_audio_and_connection_is_reused():
    async def main():
        eng = FakeEngine(interval=0.02, chunks_per_segment=200)  # 20 s of audio if not cancelled
        async with Harness(eng) as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", text="A long text.", end=True)
            assert (await recv(ws))["type"] == "started"
            m = await recv(ws)
            assert isinstance(m, bytes)
            await send(ws, type="cancel")
            while True:  # audio already in flight may come before the acknowledgment
                m = await recv(ws)
                if not isinstance(m, bytes):
                    break
            assert m["type"] == "cancelled"
            with pytest.raises(asyncio.TimeoutError):  # nothing after `cancelled`
                await recv(ws, timeout=0.3)
            req = eng.requests[-1]
            assert req.cancelled and req.sent_chunks < 50
            assert h.server.admission.active == 0
            await send(ws, type="cancel")  # no active request: ignored, no answer
            await send(ws, type="start", voice="bob", text="Next.", end=True)
            assert (await recv(ws))["type"] == "started"
            audio, events = await collect(ws)
            assert events[-1]["type"] == "finished" and audio

    run(main())


def test_disconnect_mid_stream_cancels():
    async def main():
        eng = FakeEngine(interval=0.02, chunks_per_segment=200)
        async with Harness(eng) as h:
            async with h.connect() as ws:
                await send(ws, type="start", voice="alice", text="A long text.", end=True)
                await recv(ws)
                assert isinstance(await recv(ws), bytes)
            for _ in range(100):
                if h.server.admission.active == 0 and eng.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert eng.requests[-1].cancelled and eng.active == 0 and h.server.admission.active == 0
            _, body, _ = await h.http("/metrics")
            assert 'cosyvoice_tts_requests_total{outcome="disconnected"} 1.0' in body

    run(main())


def test_busy_when_max_sessions_reached():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=100)
        async with Harness(eng, max_sessions=2) as h:
            async with h.connect() as a, h.connect() as b, h.connect() as c:
                for ws in (a, b):
                    await send(ws, type="start", voice="alice", text="Long.", end=True)
                    assert (await recv(ws))["type"] == "started"
                t0 = time.monotonic()
                await send(c, type="start", voice="alice", text="Hi there.", end=True)
                ev = await recv(c)
                assert ev["type"] == "error" and ev["code"] == "busy" and "request_id" not in ev
                assert time.monotonic() - t0 < 1.0
                await send(a, type="cancel")
                await collect(a)
                await send(c, type="start", voice="alice", text="Hi there.", end=True)
                assert (await recv(c))["type"] == "started"
            _, body, _ = await h.http("/metrics")
            assert 'cosyvoice_tts_requests_total{outcome="busy"} 1.0' in body

    run(main())


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"voice": "alice"}', "missing_field"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "start"}', "missing_field"),
        ('{"type": "start", "voice": "nobody", "text": "Hi there.", "end": true}', "unknown_voice"),
        ('{"type": "start", "voice": "alice", "speed": 9}', "invalid_field"),
        ('{"type": "start", "voice": "alice", "format": "mp3"}', "invalid_field"),
        ('{"type": "start", "voice": "alice", "sample_rate": 12345}', "invalid_field"),
        ('{"type": "start", "voice": "alice", "mode": "instruct2"}', "missing_field"),
        ('{"type": "start", "voice": "alice", "text": "", "end": true}', "empty_text"),
        ('{"type": "start", "voice": "alice", "text": "  😀 ** ", "end": true}', "empty_text"),
        ('{"type": "start", "voice": "alice", "text": "%s", "end": true}' % ("a" * 101), "text_too_long"),
        ('{"type": "text", "text": "hello"}', "no_active_request"),
        ('{"type": "end"}', "no_active_request"),
        ('{"type": "flush"}', "no_active_request"),
        (b"\x00\x01", "binary_not_allowed"),
        ('{"type": "text", "text": "%s"}' % ("x" * 3000), "frame_too_large"),
    ],
)
def test_bad_input_gets_stable_error_and_connection_goes_on(frame, code):
    async def main():
        async with Harness(max_text_chars=100, max_frame_bytes=2048) as h, h.connect() as ws:
            await ws.send(frame)
            ev = await recv(ws)
            assert ev["type"] == "error" and ev["code"] == code, ev
            assert isinstance(ev["message"], str) and ev["message"]
            # the same connection still works
            await send(ws, type="start", voice="alice", text="Fine now.", end=True)
            assert (await recv(ws))["type"] == "started"
            _, events = await collect(ws)
            assert events[-1]["type"] == "finished"

    run(main())


def test_errors_during_a_request():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=3)
        async with Harness(eng, max_text_chars=40) as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", request_id="r9")
            assert (await recv(ws))["type"] == "started"
            # a bad message while a request is active: reported with the request id, the request goes on
            await ws.send("{oops")
            ev = await recv(ws)
            assert ev == {"type": "error", "code": "invalid_json", "message": ev["message"], "request_id": "r9",
                          "request_ended": False}
            await send(ws, type="start", voice="alice")
            ev = await recv(ws)
            assert ev["code"] == "request_active" and ev["request_ended"] is False
            await send(ws, type="text", text="")
            assert (await recv(ws))["code"] == "empty_text"
            await send(ws, type="text", text="   ")  # whitespace fragments are fine (word separators)
            await send(ws, type="text", text="x" * 41)
            audio, events = await collect(ws)
            assert events[-1]["code"] == "text_too_long" and events[-1]["request_ended"] is True
            assert eng.requests[-1].cancelled and h.server.admission.active == 0
            # nothing speakable at end -> empty_text ends the request
            await send(ws, type="start", voice="alice", text="🎉🎉")
            await recv(ws)
            await send(ws, type="end")
            _, events = await collect(ws)
            assert events[-1]["code"] == "empty_text" and events[-1]["request_ended"] is True
            # text after end
            await send(ws, type="start", voice="alice", text="Some words here.")
            await recv(ws)
            await send(ws, type="end")
            await send(ws, type="text", text="late")
            audio, events = await collect(ws)
            assert [e.get("code") for e in events] == ["text_ended", None]
            assert events[-1]["type"] == "finished" and audio
            # an engine failure mid-stream ends that request only
            await send(ws, type="start", voice="fail", text="Boom.", end=True)
            await recv(ws)
            _, events = await collect(ws)
            assert events[-1]["code"] == "generation_failed" and events[-1]["request_ended"] is True
            await send(ws, type="start", voice="alice", text="Still fine.", end=True)
            await recv(ws)
            _, events = await collect(ws)
            assert events[-1]["type"] == "finished"

    run(main())


def test_text_timeout_ends_a_stalled_request():
    async def main():
        async with Harness(text_timeout=0.3) as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", text="Waiting")
            await recv(ws)
            t0 = time.monotonic()
            _, events = await collect(ws)
            assert events[-1]["code"] == "timeout" and events[-1]["request_ended"] is True
            assert 0.25 < time.monotonic() - t0 < 3
            assert h.server.admission.active == 0

    run(main())


def test_resampling_and_wav_format():
    async def main():
        async with Harness() as h, h.connect() as ws:
            await send(ws, type="start", voice="alice", text="Hello there.", end=True, sample_rate=16000,
                       format="wav", seed=5)
            st = await recv(ws)
            assert st["sample_rate"] == 16000 and st["format"] == "wav"
            audio, events = await collect(ws)
            assert audio[:4] == b"RIFF" and audio[8:16] == b"WAVEfmt "
            assert int.from_bytes(audio[24:28], "little") == 16000
            pcm = audio[44:]
            assert abs(len(pcm) / 2 - 0.2 * 16000) <= 64
            assert abs(dominant_freq(pcm, 16000) - 400.0) < 15
            assert events[-1]["stats"]["audio_s"] == pytest.approx(0.2, abs=0.005)

    run(main())


def test_auth_refused_before_any_work():
    async def main():
        eng = FakeEngine()
        async with Harness(eng, auth_token="s3cret") as h:
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                with pytest.raises(InvalidStatus) as ei:
                    async with h.connect(headers):
                        pass
                assert ei.value.response.status_code == 401
                assert json.loads(ei.value.response.body)["code"] == "unauthorized"
            assert eng.requests == []
            for value in ("Bearer s3cret", "bearer s3cret"):
                async with h.connect({"Authorization": value}) as ws:
                    await send(ws, type="start", voice="alice", text="Hi there.", end=True)
                    assert (await recv(ws))["type"] == "started"
                    await collect(ws)
            # health endpoints need no token
            assert (await h.http("/healthz"))[0] == 200

    run(main())


def test_http_routes_readiness_and_metrics():
    async def main():
        h = Harness()
        await h.server.start()
        try:
            assert (await h.http("/healthz"))[:2] == (200, "ok\n")
            assert (await h.http("/readyz"))[:2] == (503, "loading\n")
            # while loading, the handshake itself is refused (a load balancer fails over on the 503)
            with pytest.raises(InvalidStatus) as refused:
                async with h.connect():
                    pass
            assert refused.value.response.status_code == 503
            h.server.attach_engine(h.engine)
            h.server.set_ready()
            assert (await h.http("/readyz"))[:2] == (200, "ready\n")
            assert (await h.http("/nope"))[0] == 404
            async with h.connect() as ws:
                await send(ws, type="voices")
                assert (await recv(ws)) == {"type": "voices", "voices": ["alice", "bob", "fail"], "worker": "w-test"}
                await send(ws, type="start", voice="alice", text="Hello there friend.", end=True)
                await recv(ws)
                await collect(ws)
            status, body, headers = await h.http("/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            for line in (
                'cosyvoice_tts_requests_total{outcome="finished"} 1.0',
                "cosyvoice_tts_sessions_active 0.0",
                "cosyvoice_tts_first_chunk_seconds_count 1.0",
                "cosyvoice_tts_rtf_count 1.0",
                "cosyvoice_tts_audio_seconds_total 0.2",
                "cosyvoice_tts_gpu_memory_bytes 0.0",
                "cosyvoice_tts_engine_steps 3.0",
                "cosyvoice_tts_ready 1.0",
                "cosyvoice_tts_max_sessions 16.0",
                'cosyvoice_tts_errors_total{code="not_ready"} 1.0',
            ):
                assert line in body, line
        finally:
            await h.server.close()

    run(main())


def test_drain_finishes_in_flight_and_refuses_new():
    async def main():
        eng = FakeEngine(interval=0.02, chunks_per_segment=10)  # 0.2 s per request
        async with Harness(eng) as h:
            async with h.connect() as a, h.connect() as b:
                await send(a, type="start", voice="alice", text="In flight.", end=True)
                assert (await recv(a))["type"] == "started"
                drain = asyncio.create_task(h.server.drain(timeout=10))
                await asyncio.sleep(0.02)
                assert (await h.http("/readyz"))[:2] == (503, "draining\n")
                await send(b, type="start", voice="alice", text="New one.", end=True)
                ev = await recv(b)
                assert ev["code"] == "draining"
                audio, events = await collect(a)
                assert events[-1]["type"] == "finished" and len(audio) == 10 * 2 * int(0.1 * SR)
                assert await drain is True
                with pytest.raises(ConnectionClosed) as ei:
                    await a.recv()
                assert ei.value.rcvd.code == 1001

    run(main())


def test_drain_timeout_cuts_requests():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=1000)
        async with Harness(eng) as h, h.connect() as a:
            await send(a, type="start", voice="alice", text="Endless.", end=True)
            await recv(a)
            t0 = time.monotonic()
            assert await h.server.drain(timeout=0.3) is False
            assert time.monotonic() - t0 < 3
            _, events = await collect(a)
            assert events[-1]["code"] == "draining" and events[-1]["request_ended"] is True
            assert eng.requests[-1].cancelled

    run(main())


def test_concurrent_sessions_each_get_their_own_audio():
    async def main():
        eng = FakeEngine(interval=0.01, chunks_per_segment=3)
        async with Harness(eng) as h:

            async def one(i):
                async with h.connect() as ws:
                    await send(ws, type="start", voice="alice", seed=i, request_id=f"c{i}")
                    assert (await recv(ws))["request_id"] == f"c{i}"
                    for frag in ["Session", f" number {i}", " speaks", " now."]:
                        await send(ws, type="text", text=frag)
                    await send(ws, type="end")
                    audio, events = await collect(ws)
                    return i, audio, events[-1]

            results = await asyncio.gather(*(one(i) for i in range(8)))
            for i, audio, fin in results:
                assert fin["type"] == "finished" and fin["request_id"] == f"c{i}"
                assert abs(dominant_freq(audio) - (200 + 40 * i)) < 15, i

    run(main())


def test_connection_limit_refuses_handshake():
    async def main():
        async with Harness(max_connections=1) as h, h.connect() as ws:
            await send(ws, type="voices")
            await recv(ws)
            with pytest.raises(InvalidStatus) as ei:
                async with h.connect():
                    pass
            assert ei.value.response.status_code == 503
            assert json.loads(ei.value.response.body)["code"] == "busy"

    run(main())


def test_unexpected_exceptions_become_internal_errors():
    async def main():
        eng = FakeEngine()
        async with Harness(eng) as h, h.connect() as ws:
            real_voices = eng.voices
            eng.voices = lambda: 1 / 0  # a bug while handling `start`
            await send(ws, type="start", voice="alice", text="Hi there.", end=True)
            ev = await recv(ws)
            assert ev["type"] == "error" and ev["code"] == "internal"
            eng.voices = real_voices
            real_submit = eng.submit
            eng.submit = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("submit broke"))
            await send(ws, type="start", voice="alice", text="Hi there.", end=True)
            assert (await recv(ws))["code"] == "internal"
            assert h.server.admission.active == 0
            eng.submit = real_submit
            await send(ws, type="start", voice="alice", text="Hi there.", end=True)
            assert (await recv(ws))["type"] == "started"
            _, events = await collect(ws)
            assert events[-1]["type"] == "finished"

    run(main())
