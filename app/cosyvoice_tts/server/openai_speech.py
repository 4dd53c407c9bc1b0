"""OpenAI-style ``POST /v1/audio/speech`` on the worker's HTTP API listener (``--http-port``).

Why a second listener: the WebSocket port is served by ``websockets``, whose HTTP side only answers GET requests
with a complete body; a speech response must stream (chunked transfer encoding, audio as it is produced). So the
worker runs a small asyncio HTTP/1.1 server of its own on ``--http-port`` (default ``--port`` + 1000) for
``POST /v1/audio/speech`` (and ``/v1/audio/speech/``); nginx routes that location to it. See docs/protocol.md.

A speech request is one request of the worker's own protocol: ``SpeechSession`` is a ``Session`` (session.py)
whose "connection" is a ``_Channel`` that turns the session's events into the HTTP response (the first audio ->
``200`` and its headers, audio -> body chunks or SSE ``speech.audio.delta`` events, ``finished`` -> end of body or
``speech.audio.done``, ``error`` before any audio -> a JSON error with its status). Admission, cancellation on
disconnect, drain, metrics and the request log line are the same code as for ``/ws``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .audio_formats import CONTENT_TYPES, AudioEncoder, mp3_unavailable_reason
from .auth import check_bearer
from .compat import pick_mode, unknown_voice_message
from .session import Session

if TYPE_CHECKING:
    from .app import WorkerServer

log = logging.getLogger("cosyvoice_tts.server")

PATHS = ("/v1/audio/speech", "/v1/audio/speech/")
FORMATS = ("mp3", "wav", "pcm")  # opus, aac, flac: refused with a clear 400
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")
SAMPLE_RATE = 24000  # OpenAI's pcm is 24 kHz s16le mono; wav and mp3 use the same rate
SPEED_RANGE = P.SPEED_RANGE  # OpenAI allows 0.25-4.0; the engine 0.5-2.0: outside is refused, not clamped
UNSUPPORTED = "unsupported"

MAX_HEAD_BYTES = 16 * 1024
KEEPALIVE_TIMEOUT = 75.0  # idle keep-alive connection (nginx's upstream keepalive_timeout is 60 s by default)
HEAD_TIMEOUT = 30.0  # a started request head or body must arrive within this
_KNOWN_FIELDS = ("input", "model", "voice", "instructions", "response_format", "speed", "stream_format")

# our error codes -> HTTP status
_STATUS = {
    P.UNAUTHORIZED: HTTPStatus.UNAUTHORIZED,
    P.BUSY: HTTPStatus.SERVICE_UNAVAILABLE,
    P.DRAINING: HTTPStatus.SERVICE_UNAVAILABLE,
    P.NOT_READY: HTTPStatus.SERVICE_UNAVAILABLE,
    P.TIMEOUT: HTTPStatus.REQUEST_TIMEOUT,
    P.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
    "generation_failed": HTTPStatus.INTERNAL_SERVER_ERROR,
    "not_found": HTTPStatus.NOT_FOUND,
    "method_not_allowed": HTTPStatus.METHOD_NOT_ALLOWED,
    "body_too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "headers_too_large": HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
    "not_implemented": HTTPStatus.NOT_IMPLEMENTED,
}


def http_status(code: str) -> HTTPStatus:
    return _STATUS.get(code, HTTPStatus.BAD_REQUEST)


class SpeechError(Exception):
    """A refused request: ``code`` (ours), message, and the request field it concerns."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def error_body(code: str, message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape (the openai SDK reads ``error.message``)."""
    status = http_status(code)
    etype = "server_error" if status >= 500 else "invalid_request_error"
    return (json.dumps({"error": {"message": message, "type": etype, "param": param, "code": code}},
                       ensure_ascii=False) + "\n").encode("utf-8")  # fmt: skip


@dataclass
class SpeechRequest:
    input: str
    model: str
    voice: str
    instructions: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"


def parse_speech_request(body: Any) -> SpeechRequest:
    """Validate the JSON body of ``POST /v1/audio/speech``."""
    if not isinstance(body, dict):
        raise SpeechError(P.INVALID_JSON, "the request body must be a JSON object")
    for key in body:
        if key not in _KNOWN_FIELDS:
            raise SpeechError(UNSUPPORTED, f"unrecognized request argument supplied: {key}", key)
    text = body.get("input")
    if text is None:
        raise SpeechError(P.MISSING_FIELD, "'input' is required", "input")
    if not isinstance(text, str):
        raise SpeechError(P.INVALID_FIELD, "'input' must be a string", "input")
    if not text.strip():
        raise SpeechError(P.EMPTY_TEXT, "'input' is empty", "input")
    model = body.get("model")
    if model is None:
        raise SpeechError(P.MISSING_FIELD, "'model' is required (any name: this worker serves one model)", "model")
    if not isinstance(model, str) or not model.strip():
        raise SpeechError(P.INVALID_FIELD, "'model' must be a non-empty string", "model")
    voice = body.get("voice")
    if isinstance(voice, dict):
        vid = voice.get("id")
        if set(voice) - {"id"} or not isinstance(vid, str):
            raise SpeechError(P.INVALID_FIELD, "'voice' must be a string or {\"id\": \"...\"}", "voice")
        voice = vid
    if voice is None:
        raise SpeechError(P.MISSING_FIELD, "'voice' is required", "voice")
    if not isinstance(voice, str) or not voice.strip() or len(voice) > 256:
        raise SpeechError(P.INVALID_FIELD, "'voice' must be a non-empty string or {\"id\": \"...\"}", "voice")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise SpeechError(P.INVALID_FIELD, "'instructions' must be a string", "instructions")
        if len(instructions) > 1000:
            raise SpeechError(P.INVALID_FIELD, "'instructions' is longer than 1000 characters", "instructions")
        instructions = instructions.strip() or None
    fmt = body.get("response_format", "mp3")
    if fmt is None:
        fmt = "mp3"
    if fmt not in OPENAI_FORMATS:
        raise SpeechError(P.INVALID_FIELD, f"'response_format' must be one of {', '.join(OPENAI_FORMATS)}",
                          "response_format")  # fmt: skip
    if fmt not in FORMATS:
        raise SpeechError(UNSUPPORTED, f"response_format {fmt!r} is not supported by this worker; use "
                          f"{', '.join(FORMATS)}", "response_format")  # fmt: skip
    if fmt == "mp3":
        reason = mp3_unavailable_reason()
        if reason:
            raise SpeechError(UNSUPPORTED, reason, "response_format")
    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if not isinstance(speed, (int, float)) or isinstance(speed, bool):
        raise SpeechError(P.INVALID_FIELD, "'speed' must be a number", "speed")
    if not 0.25 <= speed <= 4.0:
        raise SpeechError(P.INVALID_FIELD, "'speed' must be in [0.25, 4.0]", "speed")
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise SpeechError(UNSUPPORTED, f"speed {speed:g} is not supported by this worker; use "
                          f"{SPEED_RANGE[0]}-{SPEED_RANGE[1]}", "speed")  # fmt: skip
    stream_format = body.get("stream_format", "audio")
    if stream_format is None:
        stream_format = "audio"
    if stream_format not in STREAM_FORMATS:
        raise SpeechError(P.INVALID_FIELD, "'stream_format' must be 'audio' or 'sse'", "stream_format")
    return SpeechRequest(text, model, voice, instructions, fmt, float(speed), stream_format)


# ------------------------------------------------------------------------------------------------------------
# HTTP/1.1, as much as this endpoint needs


class _HttpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header_tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        conn = self.header_tokens("connection")
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return False  # HTTP/1.0: close after the response (its body is close-delimited)


def _token_ok(name: str) -> bool:
    return bool(name) and all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={}' for c in name)


class _Conn:
    """One client connection: buffered reading of request heads and bodies, writing of responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.busy = False
        peer = writer.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else ("?", 0)

    async def _fill(self) -> bool:
        if self.eof:
            return False
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            return False
        self.buf.extend(data)
        return True

    async def read_head(self) -> _Request | None:
        """The next request head, or None when the client closed (or idled out) between requests."""
        try:
            async with asyncio.timeout(KEEPALIVE_TIMEOUT):
                while not self.buf.strip(b"\r\n"):
                    self.buf.clear()  # blank lines between requests are allowed (RFC 9112 2.2)
                    if not await self._fill():
                        return None
        except TimeoutError:
            return None
        async with asyncio.timeout(HEAD_TIMEOUT):
            while True:
                i = self.buf.find(b"\r\n\r\n")
                if i >= 0:
                    break
                if len(self.buf) > MAX_HEAD_BYTES:
                    raise _HttpError("headers_too_large", "request head too large")
                if not await self._fill():
                    return None
        if i > MAX_HEAD_BYTES:
            raise _HttpError("headers_too_large", "request head too large")
        head = bytes(self.buf[:i]).decode("latin-1")
        del self.buf[: i + 4]
        lines = head.lstrip("\r\n").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not _token_ok(parts[0]):
            raise _HttpError(P.INVALID_FIELD, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not _token_ok(name):
                raise _HttpError(P.INVALID_FIELD, "malformed header line")
            name = name.lower()
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return _Request(parts[0], parts[1], parts[2], headers)

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise _HttpError(P.INVALID_FIELD, "the connection closed inside the request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_line(self, limit: int = 4096) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > limit:
                raise _HttpError(P.INVALID_FIELD, "malformed chunked body")
            if not await self._fill():
                raise _HttpError(P.INVALID_FIELD, "the connection closed inside the request body")

    async def read_body(self, req: _Request, limit: int) -> bytes:
        async with asyncio.timeout(HEAD_TIMEOUT):
            te = req.headers.get("transfer-encoding")
            if te is not None:
                if te.strip().lower() != "chunked":
                    raise _HttpError("not_implemented", f"transfer-encoding {te!r} is not supported")
                out = bytearray()
                while True:
                    size_line = (await self._read_line()).split(b";", 1)[0].strip()
                    try:
                        size = int(size_line, 16)
                    except ValueError:
                        raise _HttpError(P.INVALID_FIELD, "malformed chunked body") from None
                    if size == 0:
                        while await self._read_line():  # trailer fields, up to the empty line
                            pass
                        return bytes(out)
                    if len(out) + size > limit:
                        raise _HttpError("body_too_large", f"request body larger than {limit} bytes")
                    out += await self._read_exact(size)
                    if await self._read_exact(2) != b"\r\n":
                        raise _HttpError(P.INVALID_FIELD, "malformed chunked body")
            cl = req.headers.get("content-length")
            if cl is None:
                return b""
            if not cl.strip().isdigit():
                raise _HttpError(P.INVALID_FIELD, "malformed content-length")
            n = int(cl)
            if n > limit:
                raise _HttpError("body_too_large", f"request body larger than {limit} bytes")
            return await self._read_exact(n)

    async def watch(self, on_eof) -> None:
        """While a response streams: note the client going away (EOF); keep what it sends (pipelining)."""
        while len(self.buf) < MAX_HEAD_BYTES:
            if not await self._fill():
                on_eof()
                return

    async def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("the client connection is closed")
        self.writer.write(data)
        await self.writer.drain()

    async def respond(self, status: int, body: bytes, content_type: str, *, keep_alive: bool,
                      headers: dict[str, str] | None = None) -> None:  # fmt: skip
        head = [f"HTTP/1.1 {int(status)} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]  # fmt: skip
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}")
        await self.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


# ------------------------------------------------------------------------------------------------------------
# the speech request as a session of the worker protocol


class _Channel:
    """What ``Session`` sees as its connection: ``recv`` gives the start message once, then waits for the end
    of the exchange; ``send`` turns the session's events and audio into the HTTP response."""

    def __init__(self, conn: _Conn, req: _Request, start: dict[str, Any], fmt: str, sse: bool, keep_alive: bool):
        self.conn = conn
        self.start = json.dumps(start, ensure_ascii=False)
        self.fmt = fmt
        self.sse = sse
        self.chunked = req.version == "HTTP/1.1"
        self.keep_alive = keep_alive and self.chunked
        self.head_sent = False
        self.request_id = ""
        self.done = asyncio.Event()  # the response is complete (or can't be)
        self._closed = asyncio.Event()  # the session must stop: the exchange is over or the client left
        self._start_sent = False
        self.remote_address = conn.peer

    async def recv(self) -> str:
        if not self._start_sent:
            self._start_sent = True
            return self.start
        await self._closed.wait()
        raise ConnectionClosed(None, None)

    def close(self) -> None:
        self._closed.set()

    def client_gone(self) -> None:
        self.keep_alive = False
        self._closed.set()
        self.done.set()

    async def _write(self, data: bytes) -> None:
        if self._closed.is_set():
            raise ConnectionClosed(None, None)
        try:
            await self.conn.write(data)
        except (ConnectionError, RuntimeError, OSError):
            self.client_gone()
            raise ConnectionClosed(None, None) from None

    async def _body(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        await self._write(data)

    async def _end_body(self) -> None:
        if self.chunked:
            await self._write(b"0\r\n\r\n")
        else:
            self.keep_alive = False

    async def _sse(self, event: dict[str, Any]) -> None:
        await self._body(b"data: " + json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n\n")

    async def _head(self) -> None:
        """The 200 head, sent with the first audio (or the end): an engine failure before any audio still gets
        an error status."""
        if self.head_sent:
            return
        ctype = "text/event-stream" if self.sse else CONTENT_TYPES[self.fmt]
        head = ["HTTP/1.1 200 OK", f"Content-Type: {ctype}", "Cache-Control: no-store",
                f"X-Request-Id: {self.request_id}", "X-Accel-Buffering: no"]  # fmt: skip
        if self.chunked:
            head.append("Transfer-Encoding: chunked")
        head.append(f"Connection: {'keep-alive' if self.keep_alive else 'close'}")
        self.head_sent = True
        await self._write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

    async def send(self, data: Any) -> None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            await self._head()
            if self.sse:
                await self._sse({"type": "speech.audio.delta", "audio": base64.b64encode(bytes(data)).decode("ascii")})
            else:
                await self._body(bytes(data))
            return
        event = json.loads(data)
        etype = event.get("type")
        if etype == "started":
            self.request_id = str(event.get("request_id", ""))
        elif etype == "finished":
            await self._head()
            if self.sse:
                stats = event.get("stats") or {}
                tin = stats.get("text_tokens") if isinstance(stats.get("text_tokens"), int) else stats.get("chars", 0)
                tout = stats.get("speech_tokens") if isinstance(stats.get("speech_tokens"), int) else 0
                await self._sse({"type": "speech.audio.done",
                                 "usage": {"input_tokens": tin, "output_tokens": tout, "total_tokens": tin + tout}})
            await self._end_body()
            self.done.set()
        elif etype == "error":
            code, message = event.get("code", P.INTERNAL), event.get("message", "")
            if not self.head_sent:
                status = http_status(code)
                extra = {"Retry-After": "1"} if status == HTTPStatus.SERVICE_UNAVAILABLE else None
                try:
                    await self.conn.respond(status, error_body(code, message), "application/json",
                                            keep_alive=self.keep_alive, headers=extra)  # fmt: skip
                except (ConnectionError, RuntimeError, OSError):
                    self.keep_alive = False
                self.done.set()
            elif self.sse:  # the status is sent: say it in the stream, then end it
                try:
                    await self._sse({"type": "error", "error": {"message": message, "type": "server_error",
                                                                "param": None, "code": code}})  # fmt: skip
                    await self._end_body()
                except ConnectionClosed:
                    pass
                self.done.set()
            else:  # raw audio with its 200 sent: cut the connection so the client sees an incomplete body
                self.keep_alive = False
                self.conn.writer.transport.abort()
                self.done.set()
        # `cancelled` / `voices` do not occur on this channel


class SpeechSession(Session):
    """One ``POST /v1/audio/speech`` as a request of the worker protocol (see the module docstring)."""

    def __init__(self, server: "WorkerServer", channel: _Channel) -> None:
        super().__init__(server, channel)
        self.channel = channel

    async def _send_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "started" and self.channel.fmt == "mp3" and self.active is not None:
            # the pump has not run yet: its encoder can still be chosen
            self.active.encoder = AudioEncoder(self.server.engine.sample_rate, SAMPLE_RATE, "mp3")
        await super()._send_event(event)


class HttpApiServer:
    """The worker's HTTP API listener (``--http-port``)."""

    def __init__(self, server: "WorkerServer") -> None:
        self.server = server
        self._srv: asyncio.Server | None = None
        self._conns: dict[_Conn, asyncio.Task] = {}

    async def start(self, host: str, port: int) -> None:
        self._srv = await asyncio.start_server(self._client, host, port)

    @property
    def port(self) -> int:
        assert self._srv is not None
        return self._srv.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._srv is None:
            return
        self._srv.close()
        for conn, task in list(self._conns.items()):
            if conn.busy:
                conn.writer.transport.abort()
            else:
                conn.writer.close()
            task.cancel()
        await asyncio.gather(*self._conns.values(), return_exceptions=True)
        await self._srv.wait_closed()
        self._srv = None

    @property
    def body_limit(self) -> int:
        return max(1 << 20, 8 * self.server.cfg.max_text_chars)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        self._conns[conn] = asyncio.current_task()  # type: ignore[assignment]
        try:
            while True:
                try:
                    req = await conn.read_head()
                except (_HttpError, TimeoutError) as exc:
                    code = exc.code if isinstance(exc, _HttpError) else P.TIMEOUT
                    msg = exc.message if isinstance(exc, _HttpError) else "request head timed out"
                    await conn.respond(http_status(code), error_body(code, msg), "application/json", keep_alive=False)
                    return
                if req is None:
                    return
                conn.busy = True
                try:
                    keep = await self._dispatch(conn, req)
                except (_HttpError, TimeoutError) as exc:
                    code = exc.code if isinstance(exc, _HttpError) else P.TIMEOUT
                    msg = exc.message if isinstance(exc, _HttpError) else "request body timed out"
                    await self._refuse(conn, code, msg, keep_alive=False)
                    return
                finally:
                    conn.busy = False
                if not keep or self.server.draining:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001
            log.exception("HTTP API: connection handler failed")
        finally:
            self._conns.pop(conn, None)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _refuse(self, conn: _Conn, code: str, message: str, *, keep_alive: bool, param: str | None = None,
                      headers: dict[str, str] | None = None) -> bool:  # fmt: skip
        self.server.metrics.errors.labels(code).inc()
        status = http_status(code)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            headers = {"Retry-After": "1", **(headers or {})}
        await conn.respond(status, error_body(code, message, param), "application/json", keep_alive=keep_alive,
                           headers=headers)  # fmt: skip
        return keep_alive

    async def _dispatch(self, conn: _Conn, req: _Request) -> bool:
        """Serve one request; True when the connection may serve another."""
        keep = req.keep_alive and not self.server.draining
        if req.path not in PATHS:
            await self._drain_body(conn, req)
            return await self._refuse(conn, "not_found", f"no route for {req.method} {req.path}; "
                                      f"use POST {PATHS[0]}", keep_alive=keep)  # fmt: skip
        if req.method != "POST":
            await self._drain_body(conn, req)
            return await self._refuse(conn, "method_not_allowed", f"{req.method} is not allowed; use POST",
                                      keep_alive=keep, headers={"Allow": "POST"})  # fmt: skip
        return await self._speech(conn, req, keep)

    async def _drain_body(self, conn: _Conn, req: _Request) -> None:
        await conn.read_body(req, self.body_limit)

    async def _speech(self, conn: _Conn, req: _Request, keep: bool) -> bool:
        srv = self.server
        expect_continue = "100-continue" in req.header_tokens("expect")
        if not check_bearer(srv.cfg.auth_token, req.headers.get("authorization")):
            log.warning("refused %s from %s:%d: missing or wrong bearer token", req.path, *conn.peer)
            if expect_continue:  # the client waits with its body: answer now and close
                keep = False
            else:  # read the body first: closing on unread data could reset the connection before the answer
                await conn.read_body(req, self.body_limit)
            return await self._refuse(conn, P.UNAUTHORIZED, "missing or wrong bearer token", keep_alive=keep,
                                      headers={"WWW-Authenticate": 'Bearer realm="cosyvoice-tts"'})  # fmt: skip
        if expect_continue:
            await conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = await conn.read_body(req, self.body_limit)
        try:
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise SpeechError(P.INVALID_JSON, f"the request body is not valid JSON: {exc}") from None
            sreq = parse_speech_request(body)
            if srv.ready and srv.engine is not None and not srv.draining:
                unknown = unknown_voice_message(srv.engine, sreq.voice)
                if unknown:
                    raise SpeechError(P.UNKNOWN_VOICE, unknown, "voice")
        except SpeechError as exc:
            return await self._refuse(conn, exc.code, exc.message, keep_alive=keep, param=exc.param)
        if len(srv.sessions) >= srv.cfg.max_connections:
            return await self._refuse(conn, P.BUSY, f"at most {srv.cfg.max_connections} connections per worker",
                                      keep_alive=keep)  # fmt: skip
        start: dict[str, Any] = {
            "type": "start", "voice": sreq.voice, "speed": sreq.speed, "text": sreq.input, "end": True,
            "format": "wav" if sreq.response_format == "wav" else "pcm", "sample_rate": SAMPLE_RATE,
        }  # fmt: skip
        if srv.engine is not None:
            start["mode"] = pick_mode(srv.engine, sreq.voice, sreq.instructions)
            if sreq.instructions:
                start["instruct_text"] = sreq.instructions
        channel = _Channel(conn, req, start, sreq.response_format, sreq.stream_format == "sse", keep)
        session = SpeechSession(srv, channel)
        srv.sessions.add(session)
        srv.metrics.connections_active.set(len(srv.sessions))
        run = asyncio.create_task(session.run(), name="speech-session")
        watch = asyncio.create_task(conn.watch(channel.client_gone), name="speech-watch")
        try:
            done = asyncio.create_task(channel.done.wait())
            await asyncio.wait({done, run}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            if not channel.done.is_set():  # the session ended without answering: a bug
                log.error("speech session ended without a response")
                channel.keep_alive = False
        finally:
            channel.close()
            watch.cancel()
            try:
                await run
            except Exception:  # noqa: BLE001
                log.exception("speech session failed")
                channel.keep_alive = False
            try:
                await watch
            except asyncio.CancelledError:
                pass
            srv.sessions.discard(session)
            srv.metrics.connections_active.set(len(srv.sessions))
        return channel.keep_alive


__all__ = ["HttpApiServer", "SpeechSession", "parse_speech_request", "SpeechRequest", "SpeechError", "PATHS"]
