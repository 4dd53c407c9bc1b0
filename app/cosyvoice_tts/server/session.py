"""One WebSocket connection on `/ws`: the protocol state machine (docs/protocol.md).

A connection serves requests one after another. For the active request a *pump* task moves audio from the
engine to the socket while the connection's reader task handles control messages; a cancel (or a disconnect)
cancels the engine request and the pump, and only then answers ``cancelled``, so no audio frame of the
request can follow it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from ..text_stream import TextSegmenter, join_segments, segment_text
from . import protocol as P
from .audio import PcmEncoder

if TYPE_CHECKING:
    from .app import WorkerServer

log = logging.getLogger("cosyvoice_tts.server")
reqlog = logging.getLogger("cosyvoice_tts.server.requests")

ENGINE_RELEASE_TIMEOUT = 5.0  # seconds to wait for the engine to confirm a cancel

# engine error codes -> protocol error codes
_ENGINE_CODES = {"capacity": P.BUSY, "unknown_voice": P.UNKNOWN_VOICE}


def engine_error_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return _ENGINE_CODES.get(code, code)
    return P.INTERNAL


class ActiveRequest:
    def __init__(self, request_id: str, params: P.StartParams, encoder: PcmEncoder) -> None:
        self.id = request_id
        self.params = params
        self.encoder = encoder
        self.engine_req: Any = None
        self.segmenter = TextSegmenter()
        self.text_open = True  # False after `end` (or a whole text)
        self.chars = 0  # characters of text received
        self.segments = 0  # segments handed to the engine
        self.t_start = time.monotonic()
        self.t_first_text: float | None = None
        self.t_first_audio: float | None = None
        self.pump: asyncio.Task | None = None
        self.closed = False

    def note_text(self, n: int) -> None:
        self.chars += n
        if self.t_first_text is None:
            self.t_first_text = time.monotonic()


class Session:
    def __init__(self, server: "WorkerServer", ws: Any) -> None:
        self.server = server
        self.ws = ws
        self.cfg = server.cfg
        self.active: ActiveRequest | None = None
        self.peer = _peer(ws)

    # -- sending ---------------------------------------------------------------------------------------
    async def _send_event(self, event: dict[str, Any]) -> None:
        try:
            await self.ws.send(P.dumps(event))
        except ConnectionClosed:
            pass

    async def _send_error(self, code: str, message: str, *, request_ended: bool = False,
                          request_id: str | None = None) -> None:  # fmt: skip
        self.server.metrics.errors.labels(code).inc()
        rid = request_id if request_id is not None else (self.active.id if self.active else None)
        try:
            await self.ws.send(P.error_event(code, message, rid, request_ended))
        except ConnectionClosed:
            pass

    # -- main loop -------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                timeout = self.cfg.text_timeout if (self.active and self.active.text_open) else None
                try:
                    if timeout is None:
                        message = await self.ws.recv()
                    else:
                        message = await asyncio.wait_for(self.ws.recv(), timeout)
                except asyncio.TimeoutError:
                    if self.active is not None and self.active.text_open:
                        req = self.active
                        await self._abort(req, "error", error=P.TIMEOUT)
                        await self._send_error(
                            P.TIMEOUT, f"no text message for {self.cfg.text_timeout:g} s", request_ended=True,
                            request_id=req.id,
                        )  # fmt: skip
                    continue
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            if self.active is not None:
                await self._abort(self.active, "disconnected")

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, (bytes, bytearray, memoryview)):
            if len(message) > self.cfg.max_frame_bytes:
                await self._send_error(P.FRAME_TOO_LARGE, f"frame of {len(message)} bytes; at most {self.cfg.max_frame_bytes}")
            else:
                await self._send_error(P.BINARY_NOT_ALLOWED, "binary frames are not accepted; send JSON text frames")
            return
        if len(message) > self.cfg.max_frame_bytes or len(message.encode("utf-8")) > self.cfg.max_frame_bytes:
            await self._send_error(P.FRAME_TOO_LARGE, f"frame larger than {self.cfg.max_frame_bytes} bytes")
            return
        try:
            msg = P.parse_message(message)
            handler = getattr(self, "_on_" + msg["type"])
            await handler(msg)
        except P.ProtocolError as exc:
            await self._send_error(exc.code, exc.message)
        except ConnectionClosed:
            raise
        except Exception:  # noqa: BLE001 - a bug: end the request, keep the connection and the worker
            log.exception("internal error handling a %s message", _msg_type(message))
            req = self.active
            if req is not None:
                await self._abort(req, "error", error=P.INTERNAL)
                await self._send_error(P.INTERNAL, "internal error", request_ended=True, request_id=req.id)
            else:
                await self._send_error(P.INTERNAL, "internal error")

    # -- handlers --------------------------------------------------------------------------------------
    async def _on_voices(self, msg: dict) -> None:
        engine = self.server.engine
        voices = list(engine.voices()) if engine is not None else []
        await self._send_event({"type": "voices", "voices": voices, "worker": self.server.worker_id})

    async def _on_start(self, msg: dict) -> None:
        srv = self.server
        if self.active is not None:
            raise P.ProtocolError(P.REQUEST_ACTIVE, f"request {self.active.id} is still active; cancel it or wait")
        if srv.draining:
            srv.metrics.requests.labels("draining").inc()
            raise P.ProtocolError(P.DRAINING, "this worker is shutting down; retry on another worker")
        if not srv.ready or srv.engine is None:
            raise P.ProtocolError(P.NOT_READY, "the model is still loading; retry shortly")
        params = P.parse_start(msg, default_sample_rate=srv.engine.sample_rate)
        text_whole: str | None = None
        if params.text is not None and len(params.text) > self.cfg.max_text_chars:
            raise P.ProtocolError(P.TEXT_TOO_LONG, f"text of {len(params.text)} characters; at most {self.cfg.max_text_chars} per request")
        if params.end:
            text_whole = join_segments(segment_text(params.text or ""))
            if not text_whole:
                raise P.ProtocolError(P.EMPTY_TEXT, "the request has no text to speak")
        if params.voice not in srv.engine.voices():
            raise P.ProtocolError(P.UNKNOWN_VOICE, f"unknown voice {params.voice!r}; send {{\"type\":\"voices\"}} for the list")
        if not srv.admission.try_acquire():
            srv.metrics.requests.labels("busy").inc()
            raise P.ProtocolError(P.BUSY, f"worker at its limit of {srv.admission.max_sessions} concurrent requests")
        srv.metrics.sessions_active.set(srv.admission.active)
        rid = params.request_id or uuid.uuid4().hex
        req = ActiveRequest(rid, params, PcmEncoder(srv.engine.sample_rate, params.sample_rate, params.format))
        if text_whole is not None:
            req.note_text(len(params.text or ""))
            req.segments = 1
            req.text_open = False
        try:
            req.engine_req = await asyncio.to_thread(srv.submit, params, text_whole)
        except Exception as exc:  # noqa: BLE001 - mapped to a protocol error
            srv.admission.release()
            srv.metrics.sessions_active.set(srv.admission.active)
            code = engine_error_code(exc)
            if code == P.BUSY:
                srv.metrics.requests.labels("busy").inc()
            if code == P.INTERNAL:
                log.exception("engine.submit failed for request %s", rid)
            raise P.ProtocolError(code, _message(exc) or code) from None
        self.active = req
        srv.on_request_started()
        await self._send_event({
            "type": "started", "request_id": rid, "sample_rate": params.sample_rate, "format": params.format,
            "worker": srv.worker_id,
        })  # fmt: skip
        req.pump = asyncio.create_task(self._pump(req), name=f"pump-{rid}")
        if text_whole is None and params.text:
            await self._add_text(req, params.text)

    async def _on_text(self, msg: dict) -> None:
        req = self._require_active()
        if not req.text_open:
            raise P.ProtocolError(P.TEXT_ENDED, "the request's text has ended; wait for 'finished'")
        await self._add_text(req, P.parse_text(msg))

    async def _on_flush(self, msg: dict) -> None:
        req = self._require_active()
        if not req.text_open:
            raise P.ProtocolError(P.TEXT_ENDED, "the request's text has ended; wait for 'finished'")
        if not await self._push(req, req.segmenter.flush()):
            return
        flush = getattr(req.engine_req, "flush", None)
        if callable(flush):  # an engine that can synthesise buffered text before end_text() says so
            try:
                flush()
            except Exception as exc:  # noqa: BLE001
                await self._fail(req, exc)

    async def _on_end(self, msg: dict) -> None:
        req = self._require_active()
        if not req.text_open:
            raise P.ProtocolError(P.TEXT_ENDED, "the request's text has already ended")
        if not await self._push(req, req.segmenter.flush()):
            return
        if req.segments == 0:
            await self._abort(req, "error", error=P.EMPTY_TEXT)
            await self._send_error(P.EMPTY_TEXT, "the request has no text to speak", request_ended=True, request_id=req.id)
            return
        req.text_open = False
        try:
            req.engine_req.end_text()
        except Exception as exc:  # noqa: BLE001
            await self._fail(req, exc)

    async def _on_cancel(self, msg: dict) -> None:
        if self.active is None:
            return  # the request already ended (its `finished` crossed the cancel): nothing to do, no answer
        req = self.active
        await self._abort(req, "cancelled")
        await self._send_event({"type": "cancelled", "request_id": req.id})

    # -- helpers ---------------------------------------------------------------------------------------
    def _require_active(self) -> ActiveRequest:
        if self.active is None:
            raise P.ProtocolError(P.NO_ACTIVE_REQUEST, "no active request; send 'start' first")
        return self.active

    async def _add_text(self, req: ActiveRequest, text: str) -> None:
        if req.chars + len(text) > self.cfg.max_text_chars:
            await self._abort(req, "error", error=P.TEXT_TOO_LONG)
            await self._send_error(
                P.TEXT_TOO_LONG, f"the request's text exceeds {self.cfg.max_text_chars} characters",
                request_ended=True, request_id=req.id,
            )  # fmt: skip
            return
        req.note_text(len(text))
        await self._push(req, req.segmenter.feed(text))

    async def _push(self, req: ActiveRequest, segments: list[str]) -> bool:
        """Hand whole segments to the engine's bistream. False (request failed and ended) on an engine error."""
        try:
            for seg in segments:
                req.engine_req.push_text(seg)
                req.segments += 1
        except Exception as exc:  # noqa: BLE001
            await self._fail(req, exc)
            return False
        return True

    async def _pump(self, req: ActiveRequest) -> None:
        """Engine audio -> socket, then `finished`. Cancelled by _abort."""
        chunks = req.engine_req.chunks()
        try:
            async for chunk in chunks:
                data = req.encoder.encode(chunk)
                if not data:
                    continue
                if req.t_first_audio is None:
                    req.t_first_audio = time.monotonic()
                await self.ws.send(data)
            tail = req.encoder.finish()
            if tail:
                if req.t_first_audio is None:
                    req.t_first_audio = time.monotonic()
                await self.ws.send(tail)
        except ConnectionClosed:
            return  # the reader sees the close and aborts the request
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine failure ends this request only
            if not req.closed:
                code = engine_error_code(exc)
                log.error("request %s failed in the engine: %s", req.id, exc, exc_info=code == P.INTERNAL)
                self._mark_closed(req)
                _safe_cancel(req.engine_req)  # the engine has dropped it already; harmless
                self._finalize(req, "error", error=code)
                await self._send_error(code, _message(exc), request_ended=True, request_id=req.id)
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001
                    pass
        if req.closed:
            return
        self._mark_closed(req)
        stats = self._finalize(req, "finished")
        await self._send_event({"type": "finished", "request_id": req.id, "stats": stats})

    async def _abort(self, req: ActiveRequest, outcome: str, error: str | None = None) -> None:
        """Stop the request now: cancel the engine request and the pump (so no audio frame of it follows), and
        wait (bounded) until the engine has let it go, so its KV slot is free before the admission slot is."""
        if req.closed:
            return
        self._mark_closed(req)
        _safe_cancel(req.engine_req)
        pump = req.pump
        if pump is not None and pump is not asyncio.current_task() and not pump.done():
            pump.cancel()
            try:
                await pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self._engine_released(req)
        self._finalize(req, outcome, error=error)

    async def _engine_released(self, req: ActiveRequest) -> None:
        """Consume the cancelled engine request's output (discarded) until the engine ends it."""
        if req.engine_req is None:
            return
        chunks = req.engine_req.chunks()
        try:
            async with asyncio.timeout(ENGINE_RELEASE_TIMEOUT):
                async for _ in chunks:
                    pass
        except TimeoutError:
            log.warning("request %s: the engine did not confirm the cancel within %.0f s", req.id, ENGINE_RELEASE_TIMEOUT)
        except Exception:  # noqa: BLE001 - an engine error after cancel: it is over either way
            pass
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001
                    pass

    async def _fail(self, req: ActiveRequest, exc: BaseException) -> None:
        code = engine_error_code(exc)
        log.error("request %s: engine error: %s", req.id, exc, exc_info=code == P.INTERNAL)
        await self._abort(req, "error", error=code)
        await self._send_error(code, _message(exc), request_ended=True, request_id=req.id)

    def _mark_closed(self, req: ActiveRequest) -> None:
        """No more events for this request; the connection is free for the next one."""
        req.closed = True
        if self.active is req:
            self.active = None

    def _finalize(self, req: ActiveRequest, outcome: str, error: str | None = None) -> dict[str, Any]:
        """Bookkeeping once the engine is done with a request: admission, metrics, the log line. Returns stats."""
        srv = self.server
        srv.admission.release()
        srv.metrics.sessions_active.set(srv.admission.active)
        now = time.monotonic()
        audio_s = req.encoder.audio_seconds
        t0 = req.t_first_text if req.t_first_text is not None else req.t_start
        first_ms = (req.t_first_audio - t0) * 1000.0 if req.t_first_audio is not None else None
        estats = _engine_summary(req.engine_req)
        rtf = estats.get("rtf")
        if not isinstance(rtf, (int, float)) or isinstance(rtf, bool):
            rtf = ((now - t0) / audio_s) if audio_s > 0 else None
        stats: dict[str, Any] = {
            "first_chunk_ms": round(first_ms, 1) if first_ms is not None else None,
            "audio_s": round(audio_s, 3),
            "rtf": round(float(rtf), 4) if rtf is not None else None,
            "chars": req.chars,
            "segments": req.segments,
            "worker": srv.worker_id,
        }
        for key in ("text_tokens", "speech_tokens"):
            if isinstance(estats.get(key), int):
                stats[key] = estats[key]
        if isinstance(estats.get("first_chunk_ms"), (int, float)):
            stats["engine_first_chunk_ms"] = round(float(estats["first_chunk_ms"]), 1)
        m = srv.metrics
        m.requests.labels(outcome).inc()
        if audio_s > 0:
            m.audio_seconds.inc(audio_s)
        if first_ms is not None:
            m.first_chunk.observe(first_ms / 1000.0)
        if outcome == "finished" and stats["rtf"] is not None:
            m.rtf.observe(stats["rtf"])
        reqlog.info(
            "request id=%s worker=%s peer=%s voice=%s mode=%s chars=%d segments=%d first_chunk_ms=%s audio_s=%.2f "
            "rtf=%s outcome=%s%s",
            req.id, srv.worker_id, self.peer, _q(req.params.voice), req.params.mode, req.chars, req.segments,
            stats["first_chunk_ms"], audio_s, stats["rtf"], outcome, f" error={error}" if error else "",
        )  # fmt: skip
        srv.on_request_closed()
        return stats

    async def drain_cut(self) -> None:
        """Drain timeout: end the active request with a `draining` error."""
        req = self.active
        if req is None:
            return
        await self._abort(req, "error", error=P.DRAINING)
        await self._send_error(
            P.DRAINING, "the worker is shutting down: drain timeout reached", request_ended=True, request_id=req.id
        )


def _engine_summary(engine_req: Any) -> dict[str, Any]:
    """The engine request's stats as a dict (its ``summary`` property; ``stats`` when that is a dict)."""
    for attr in ("summary", "stats"):
        try:
            value = getattr(engine_req, attr, None)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, dict):
            return value
    return {}


def _safe_cancel(engine_req: Any) -> None:
    if engine_req is None:
        return
    try:
        engine_req.cancel()
    except Exception:  # noqa: BLE001
        log.debug("engine request cancel failed", exc_info=True)


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc or type(exc).__name__)


def _msg_type(message: str) -> str:
    try:
        return str(json.loads(message).get("type"))[:32]
    except Exception:  # noqa: BLE001
        return "?"


def _peer(ws: Any) -> str:
    try:
        addr = ws.remote_address
        return f"{addr[0]}:{addr[1]}"
    except Exception:  # noqa: BLE001
        return "?"


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"' if (" " in s or '"' in s) else s


__all__ = ["Session", "ActiveRequest", "engine_error_code"]
