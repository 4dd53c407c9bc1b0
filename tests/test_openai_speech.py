"""OpenAI-style ``POST /v1/audio/speech``: body validation (pure), and the worker's HTTP API listener in process
against the TEST-ONLY fake engine of test_server.py, with the real ``openai`` SDK and raw HTTP/1.x on a socket
(chunked bodies, 100-continue, keep-alive, HTTP/1.0, limits), engine failures before and during the body,
disconnects and drain. The real worker process is covered by tests/e2e/test_protocols_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_server import SR, FakeEngine, FakeEngineError, Harness, dominant_freq, run

from cosyvoice_tts.server import openai_speech as O

openai = pytest.importorskip("openai", reason="the openai SDK is a test dependency (pip install openai)")

BODY = {"model": "tts-1", "voice": "alice", "input": "Hello there.", "response_format": "pcm"}


# ------------------------------------------------------------------------------------------------------------
# pure validation
def test_defaults_and_voice_object():
    r = O.parse_speech_request({"model": "m", "voice": {"id": "alice"}, "input": "Hi."})
    assert (r.voice, r.response_format, r.speed) == ("alice", "mp3", 1.0)
    assert (r.stream_format, r.instructions) == ("audio", None)
    r = O.parse_speech_request({**BODY, "speed": 2, "stream_format": "sse", "instructions": "  calm "})
    assert (r.speed, r.stream_format, r.instructions) == (2.0, "sse", "calm")


@pytest.mark.parametrize(
    ("patch", "code", "param"),
    [
        ({"input": None}, "missing_field", "input"),
        ({"input": 3}, "invalid_field", "input"),
        ({"input": "  "}, "empty_text", "input"),
        ({"model": None}, "missing_field", "model"),
        ({"model": ""}, "invalid_field", "model"),
        ({"voice": None}, "missing_field", "voice"),
        ({"voice": {"name": "alice"}}, "invalid_field", "voice"),
        ({"voice": 7}, "invalid_field", "voice"),
        ({"instructions": 1}, "invalid_field", "instructions"),
        ({"response_format": "ogg"}, "invalid_field", "response_format"),
        ({"response_format": "opus"}, "unsupported", "response_format"),
        ({"speed": "fast"}, "invalid_field", "speed"),
        ({"speed": 0.1}, "invalid_field", "speed"),
        ({"speed": 0.3}, "unsupported", "speed"),
        ({"stream_format": "json"}, "invalid_field", "stream_format"),
        ({"seed": 1}, "unsupported", "seed"),
    ],
)
def test_rejects(patch, code, param):
    body = dict(BODY)
    for k, v in patch.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    with pytest.raises(O.SpeechError) as ei:
        O.parse_speech_request(body)
    assert (ei.value.code, ei.value.param) == (code, param)


def test_mp3_unavailable_is_reported(monkeypatch):
    monkeypatch.setattr(O, "mp3_unavailable_reason", lambda: "mp3 output needs the 'lameenc' package")
    with pytest.raises(O.SpeechError) as ei:
        O.parse_speech_request({k: v for k, v in BODY.items() if k != "response_format"})
    assert ei.value.code == "unsupported" and "lameenc" in ei.value.message
    assert O.parse_speech_request(BODY).response_format == "pcm"


def test_http_port_flag():
    from cosyvoice_tts.server.config import parse_args

    assert parse_args([], environ={}).http_port == 9081  # --port + 1000
    assert parse_args(["--port", "0"], environ={}).http_port == 0  # a free port, like --port 0
    assert parse_args(["--http-port", "7000"], environ={}).http_port == 7000
    assert parse_args(["--http-port", "-1"], environ={}).http_port is None  # no HTTP API listener
    with pytest.raises(SystemExit):
        parse_args(["--port", "65000"], environ={})  # 66000 does not exist: say so instead of guessing


def test_error_body_shape():
    assert json.loads(O.error_body("busy", "full")) == {
        "error": {"message": "full", "type": "server_error", "param": None, "code": "busy"}}  # fmt: skip
    assert O.http_status("busy") == 503 and O.http_status("unknown_voice") == 400 and O.http_status("internal") == 500


# ------------------------------------------------------------------------------------------------------------
# in process
def api(h, **kw):
    return openai.AsyncOpenAI(api_key="k", base_url=f"http://127.0.0.1:{h.server.http_api.port}/v1", max_retries=0,
                              **kw)  # fmt: skip


async def raw(h, data: bytes, timeout=10) -> bytes:
    """Send bytes on a fresh connection; everything until the server closes it."""
    r, w = await asyncio.open_connection("127.0.0.1", h.server.http_api.port)
    w.write(data)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split raw HTTP/1.1 responses (Content-Length or chunked bodies)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            data = rest
            continue
        if headers.get("transfer-encoding") == "chunked":
            body = bytearray()
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                n = int(size_line, 16)
                if n == 0:
                    rest = rest[2:]
                    break
                body += rest[:n]
                rest = rest[n + 2 :]
            body = bytes(body)
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body, rest = rest[:n], rest[n:]
        else:
            body, rest = rest, b""
        out.append((status, headers, body))
        data = rest
    return out


def post(body: dict | bytes, *, extra: str = "", version: str = "HTTP/1.1", path: str = "/v1/audio/speech") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} {version}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"{extra}\r\n").encode() + data  # fmt: skip


def test_streams_pcm_wav_mp3_through_the_sdk():
    async def main():
        async with Harness(http_port=0) as h:
            c = api(h)
            async with c.audio.speech.with_streaming_response.create(**BODY) as r:
                assert r.headers["content-type"] == "audio/pcm" and r.headers["transfer-encoding"] == "chunked"
                assert r.headers["x-accel-buffering"] == "no" and len(r.headers["x-request-id"]) == 32
                pcm = b"".join([c async for c in r.iter_bytes()])
            assert len(pcm) == 2 * 2 * int(0.1 * SR) and abs(dominant_freq(pcm) - 200.0) < 15
            wav = await c.audio.speech.create(**{**BODY, "response_format": "wav"})
            assert wav.response.headers["content-type"] == "audio/wav" and wav.content[44:] == pcm
            mp3 = await c.audio.speech.create(**{**BODY, "response_format": "mp3"})
            assert mp3.response.headers["content-type"] == "audio/mpeg"
            x, sr = sf.read(io.BytesIO(mp3.content), dtype="float32")
            assert sr == SR and len(x) >= 2 * int(0.1 * SR)
            assert abs(dominant_freq((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()) - 200.0) < 15
            for _ in range(100):  # the server's bookkeeping ends just after the response
                if not h.server.sessions:
                    break
                await asyncio.sleep(0.02)
            assert h.server.admission.active == 0 and not h.server.sessions

    run(main())


class _FailAfterFirstChunk:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def chunks(self):
        async for c in self.inner.chunks():
            yield c
            raise FakeEngineError("generation_failed", "the fake engine failed mid-stream")


class MidStreamFailEngine(FakeEngine):
    def submit(self, params, text=None):
        req = super().submit(params, text)
        return _FailAfterFirstChunk(req) if params.voice == "bob" else req


def test_engine_failure_before_and_during_the_body():
    async def main():
        async with Harness(MidStreamFailEngine(chunks_per_segment=50), http_port=0) as h:
            c = api(h)
            with pytest.raises(openai.InternalServerError) as ei:  # before any audio: a status
                await c.audio.speech.create(**{**BODY, "voice": "fail"})
            assert ei.value.status_code == 500 and ei.value.code == "generation_failed"
            url = f"http://127.0.0.1:{h.server.http_api.port}/v1/audio/speech"
            async with httpx.AsyncClient(timeout=10) as hc:
                # raw audio with its 200 sent: the connection is cut, the body is incomplete (never silently short)
                with pytest.raises(httpx.RemoteProtocolError):
                    async with hc.stream("POST", url, json={**BODY, "voice": "bob"}) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_bytes():
                            pass
                # SSE: the error is an event, the stream ends cleanly
                r = await hc.post(url, json={**BODY, "voice": "bob", "stream_format": "sse"})
                assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
                events = [json.loads(x[6:]) for x in r.text.split("\n") if x.startswith("data: ")]
                assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
                assert len(base64.b64decode(events[0]["audio"])) == 2 * int(0.1 * SR)
                assert events[1]["error"]["code"] == "generation_failed"
            assert h.server.admission.active == 0

    run(main())


def test_not_ready_draining_and_connection_limit():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=1000)
        async with Harness(eng, http_port=0, max_connections=1) as h:
            h.server.ready = False
            (status, headers, body), = parse_responses(await raw(h, post(BODY, extra="Connection: close\r\n")))
            assert status == 503 and json.loads(body)["error"]["code"] == "not_ready" and headers["retry-after"] == "1"
            h.server.ready = True
            h.server.draining = True
            (status, headers, body), = parse_responses(await raw(h, post(BODY)))  # closed by the server
            assert status == 503 and json.loads(body)["error"]["code"] == "draining"
            assert headers["connection"] == "close"
            h.server.draining = False
            url = f"http://127.0.0.1:{h.server.http_api.port}/v1/audio/speech"
            async with httpx.AsyncClient(timeout=10) as a, httpx.AsyncClient(timeout=10) as b:
                async with a.stream("POST", url, json=BODY) as r:
                    assert r.status_code == 200
                    r2 = await b.post(url, json=BODY)
                    assert r2.status_code == 503 and r2.json()["error"]["code"] == "busy"

    run(main())


def test_http_framing_chunked_continue_pipelining_and_http10():
    async def main():
        async with Harness(http_port=0) as h:
            data = json.dumps(BODY).encode()
            chunked = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                       + b"%x;ext=1\r\n" % 10 + data[:10] + b"\r\n" + b"%x\r\n" % (len(data) - 10) + data[10:]
                       + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
            out = await raw(h, chunked)
            assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
            (status, headers, body), = parse_responses(out)
            assert status == 200 and len(body) == 2 * 2 * int(0.1 * SR) and headers["connection"] == "close"
            # two requests on one connection, sent at once; blank lines between requests are tolerated
            out = await raw(h, post(BODY) + b"\r\n" + post({**BODY, "voice": "nobody"}, extra="Connection: close\r\n"))
            (s1, h1, b1), (s2, h2, b2) = parse_responses(out)
            assert (s1, len(b1), h1["connection"]) == (200, 2 * 2 * int(0.1 * SR), "keep-alive")
            assert s2 == 400 and json.loads(b2)["error"]["code"] == "unknown_voice" and "alice, bob" in b2.decode()
            # HTTP/1.0: no chunked encoding, the body ends with the connection
            out = await raw(h, post(BODY, version="HTTP/1.0"))
            (status, headers, body), = parse_responses(out)
            assert status == 200 and "transfer-encoding" not in headers and len(body) == 2 * 2 * int(0.1 * SR)

    run(main())


def test_http_errors_and_limits():
    async def main():
        async with Harness(http_port=0, auth_token="tok", max_text_chars=100) as h:
            cases = [
                (post(BODY, extra="Connection: close\r\n"), 401, "unauthorized"),
                (post(BODY, extra="Expect: 100-continue\r\n"), 401, "unauthorized"),  # answered at once, closed
                (post(BODY, extra="Authorization: Bearer tok\r\nConnection: close\r\n", path="/v1/audio/speak"), 404,
                 "not_found"),
                (b"GET /v1/audio/speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "method_not_allowed"),
                (b"POST /v1/audio/speech HTTP/1.1\r\nContent-Length: 99999999\r\nAuthorization: Bearer tok\r\n\r\n",
                 413, "body_too_large"),
                (b"POST /v1/audio/speech HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers_too_large"),
                (b"POST /v1/audio/speech HTTP/1.1\r\nTransfer-Encoding: gzip\r\nAuthorization: Bearer tok\r\n\r\n", 501,
                 "not_implemented"),
                (b"BREW /pot\r\n\r\n", 400, "invalid_field"),
                (b"POST /v1/audio/speech HTTP/1.1\r\nbad header\r\n\r\n", 400, "invalid_field"),
                (post(b"{no", extra="Authorization: Bearer tok\r\nConnection: close\r\n"), 400, "invalid_json"),
                (post({**BODY, "input": "x" * 101}, extra="Authorization: bearer tok\r\nConnection: close\r\n"), 400,
                 "text_too_long"),
            ]  # fmt: skip
            for data, status, code in cases:
                (got, headers, body), = parse_responses(await raw(h, data))
                assert (got, json.loads(body)["error"]["code"]) == (status, code), data[:60]
                assert headers["content-type"] == "application/json"
            ok = await raw(h, post(BODY, extra="Authorization: bearer tok\r\nConnection: close\r\n"))
            assert parse_responses(ok)[0][0] == 200
            assert h.server.metrics.errors.labels("unauthorized")._value.get() == 2

    run(main())


def test_client_disconnect_and_drain_cancel_the_engine_request():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=1000)
        async with Harness(eng, http_port=0) as h:
            r, w = await asyncio.open_connection("127.0.0.1", h.server.http_api.port)
            w.write(post(BODY))
            await w.drain()
            assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(r.read(100), 10)  # some audio, then hang up
            w.close()
            for _ in range(100):
                if h.server.admission.active == 0:
                    break
                await asyncio.sleep(0.05)
            assert eng.requests[-1].cancelled and h.server.admission.active == 0 and not h.server.sessions
            assert h.server.metrics.requests.labels("disconnected")._value.get() == 1
            # drain cut: an SSE stream ends with an error event
            url = f"http://127.0.0.1:{h.server.http_api.port}/v1/audio/speech"
            async with httpx.AsyncClient(timeout=10) as c:
                async with c.stream("POST", url, json={**BODY, "stream_format": "sse"}) as resp:
                    it = resp.aiter_lines()
                    assert (await it.__anext__()).startswith("data: ")
                    drain = asyncio.create_task(h.server.drain(timeout=0.2))
                    rest = [line async for line in it]
                events = [json.loads(x[6:]) for x in rest if x.startswith("data: ")]
                assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "draining"
                assert await drain is False and eng.requests[-1].cancelled

    run(main())
