"""The cloud CosyVoice WebSocket protocol (DashScope ``SpeechSynthesizer``, ``audio/tts_v2``) on the worker.

Served at ``/api-ws/v1/inference`` (and with a trailing slash), the path of the vendor's URL, so a client of the
``dashscope`` SDK switches by setting ``dashscope.base_websocket_api_url`` (or ``DASHSCOPE_WEBSOCKET_BASE_URL``)
to ``ws://<worker or nginx>/api-ws/v1/inference``. See docs/protocol.md.

A task maps onto one request of the worker's own protocol: ``DashScopeSession`` is a ``Session`` (session.py)
whose messages are translated on the way in (run-task -> start, continue-task -> text / flush, finish-task ->
end or cancel) and whose events are translated on the way out (started -> task-started, finished / cancelled ->
task-finished, error -> task-failed), so admission, cancellation, drain, metrics and the request log line are
the same code as for ``/ws``. In this protocol every error ends the task with ``task-failed``.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from . import protocol as P
from .audio_formats import AudioEncoder, mp3_unavailable_reason
from .compat import billed_characters, pick_mode, unknown_voice_message
from .session import Session

if TYPE_CHECKING:
    from .app import WorkerServer

log = logging.getLogger("cosyvoice_tts.server")

PATHS = ("/api-ws/v1/inference", "/api-ws/v1/inference/")

RUN_TASK, CONTINUE_TASK, FINISH_TASK = "run-task", "continue-task", "finish-task"
ACTIONS = (RUN_TASK, CONTINUE_TASK, FINISH_TASK)
UNSUPPORTED = "unsupported"  # our code for an option this worker does not implement (reported, never ignored)

FORMATS = ("pcm", "wav", "mp3")
DEFAULT_FORMAT = "mp3"  # the SDK's AudioFormat.DEFAULT ("Default", sample rate 0) means mp3 at 22050 Hz
DEFAULT_SAMPLE_RATE = 22050
RATE_RANGE = (0.5, 2.0)
MAX_TASK_ID = 128
MAX_INSTRUCTION = 1000

# our error codes -> the `error_code` of task-failed (cloud style); our code leads `error_message`
_CLOUD_CODES = {
    P.BUSY: "Throttling",
    P.DRAINING: "ServiceUnavailable",
    P.NOT_READY: "ServiceUnavailable",
    P.TIMEOUT: "RequestTimeout",
    P.INTERNAL: "InternalError",
    "generation_failed": "InternalError",
}


def cloud_error_code(code: str) -> str:
    return _CLOUD_CODES.get(code, "InvalidParameter")


@dataclass
class RunTask:
    """A validated ``run-task``."""

    task_id: str
    model: str
    voice: str
    format: str = DEFAULT_FORMAT
    sample_rate: int = DEFAULT_SAMPLE_RATE
    gain: float = 1.0  # volume / 50
    speed: float = 1.0
    seed: int | None = None
    instruction: str | None = None
    enable_ssml: bool = False
    text: str | None = None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(field_name: str, what: str) -> P.ProtocolError:
    return P.ProtocolError(P.INVALID_FIELD, f"{field_name} {what}")


def _unsupported(message: str) -> P.ProtocolError:
    return P.ProtocolError(UNSUPPORTED, message)


def parse_header(msg: Any) -> tuple[dict, str, str | None]:
    """(header, action, task_id) of a client message; raises ProtocolError."""
    if not isinstance(msg, dict):
        raise P.ProtocolError(P.INVALID_JSON, "a message must be a JSON object")
    header = msg.get("header")
    if not isinstance(header, dict):
        raise P.ProtocolError(P.MISSING_FIELD, "header is required (an object with action and task_id)")
    task_id = header.get("task_id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID:
        task_id = None
    action = header.get("action")
    if action is None:
        raise P.ProtocolError(P.MISSING_FIELD, "header.action is required")
    if action not in ACTIONS:
        raise P.ProtocolError(P.UNKNOWN_TYPE, f"unknown header.action {action!r}; expected one of {', '.join(ACTIONS)}")
    if task_id is None:
        raise P.ProtocolError(P.MISSING_FIELD, f"header.task_id is required (a string of 1-{MAX_TASK_ID} characters)")
    streaming = header.get("streaming")
    if streaming is not None and streaming != "duplex":
        raise _unsupported(f"header.streaming {streaming!r} is not supported; use \"duplex\"")
    return header, action, task_id


def _payload(msg: dict) -> dict:
    payload = msg.get("payload", {})
    if not isinstance(payload, dict):
        raise _bad("payload", "must be an object")
    return payload


def _input(payload: dict) -> dict:
    inp = payload.get("input", {})
    if inp is None:
        return {}
    if not isinstance(inp, dict):
        raise _bad("payload.input", "must be an object")
    return inp


def _opt_text(inp: dict) -> str | None:
    text = inp.get("text")
    if text is None:
        return None
    if not isinstance(text, str):
        raise _bad("payload.input.text", "must be a string")
    return text or None  # older SDKs send "" in run-task / finish-task


def parse_run_task(msg: dict, task_id: str) -> RunTask:
    """Validate a ``run-task`` (payload and parameters). Unknown or unsupported options raise ``unsupported``."""
    payload = _payload(msg)
    for key, want in (("task_group", "audio"), ("task", "tts"), ("function", "SpeechSynthesizer")):
        if key in payload and payload[key] != want:
            raise _unsupported(f"payload.{key} {payload[key]!r} is not supported; this endpoint serves {want!r}")
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise P.ProtocolError(P.MISSING_FIELD, "payload.model is required (any model name: this worker serves one)")
    params = payload.get("parameters")
    if not isinstance(params, dict):
        raise P.ProtocolError(P.MISSING_FIELD, "payload.parameters is required (an object with at least voice)")
    known = {"voice", "format", "sample_rate", "volume", "rate", "pitch", "text_type", "seed", "type",
             "instruction", "language_hints", "enable_ssml", "enable_markdown_filter", "bit_rate"}  # fmt: skip
    extra = sorted(set(params) - known)
    if extra:
        raise _unsupported(f"parameter {extra[0]!r} is not supported by this worker")
    voice = params.get("voice")
    if voice is None:
        raise P.ProtocolError(P.MISSING_FIELD, "parameters.voice is required")
    if not isinstance(voice, str) or not voice.strip() or len(voice) > 256:
        raise _bad("parameters.voice", "must be a non-empty string")
    fmt = params.get("format", DEFAULT_FORMAT)
    if fmt is None or fmt == "Default":
        fmt = DEFAULT_FORMAT
    if not isinstance(fmt, str):
        raise _bad("parameters.format", "must be a string")
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise _unsupported(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if fmt == "mp3":
        reason = mp3_unavailable_reason()
        if reason:
            raise _unsupported(reason)
    if params.get("bit_rate") is not None:  # the SDK sends it with opus only
        raise _unsupported("bit_rate is not supported: mp3 is encoded at a fixed bit rate")
    sr = params.get("sample_rate", 0)
    if sr is None or sr == 0:
        sr = DEFAULT_SAMPLE_RATE
    if not _num(sr) or int(sr) != sr or int(sr) not in P.SAMPLE_RATES:
        raise _bad("parameters.sample_rate", f"must be one of {', '.join(map(str, P.SAMPLE_RATES))} (or 0)")
    volume = params.get("volume", 50)
    if volume is None:
        volume = 50
    if not _num(volume) or not 0 <= volume <= 100:
        raise _bad("parameters.volume", "must be a number in [0, 100]")
    rate = params.get("rate", 1.0)
    if rate is None:
        rate = 1.0
    if not _num(rate) or not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise _bad("parameters.rate", f"must be a number in [{RATE_RANGE[0]}, {RATE_RANGE[1]}]")
    pitch = params.get("pitch", 1.0)
    if pitch is not None and (not _num(pitch) or pitch != 1.0):
        raise _unsupported(f"pitch {pitch!r} is not supported; only 1.0")
    text_type = params.get("text_type", "PlainText")
    if text_type not in (None, "PlainText"):
        raise _unsupported(f"text_type {text_type!r} is not supported; only \"PlainText\"")
    seed = params.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 65535):
        raise _bad("parameters.seed", "must be an integer in [0, 65535]")
    stype = params.get("type", 0)
    if stype not in (None, 0):
        raise _unsupported(f"type {stype!r} is not supported; only 0")
    instruction = params.get("instruction")
    if instruction is not None:
        if not isinstance(instruction, str) or len(instruction) > MAX_INSTRUCTION:
            raise _bad("parameters.instruction", f"must be a string of at most {MAX_INSTRUCTION} characters")
        instruction = instruction.strip() or None
    hints = params.get("language_hints")
    if hints is not None and (not isinstance(hints, list) or not all(isinstance(h, str) for h in hints)):
        raise _bad("parameters.language_hints", "must be a list of strings")
    enable_ssml = params.get("enable_ssml", False)
    if enable_ssml is None:
        enable_ssml = False
    if not isinstance(enable_ssml, bool):
        raise _bad("parameters.enable_ssml", "must be a boolean")
    md = params.get("enable_markdown_filter")
    if md is not None and md is not True:
        raise _unsupported("enable_markdown_filter false is not supported: markdown is always cleaned")
    return RunTask(
        task_id=task_id, model=model, voice=voice, format=fmt, sample_rate=int(sr), gain=float(volume) / 50.0,
        speed=float(rate), seed=seed, instruction=instruction, enable_ssml=enable_ssml,
        text=_opt_text(_input(payload)),
    )  # fmt: skip


def _event(task_id: str, event: str, payload: dict | None = None, **header: Any) -> str:
    h = {"task_id": task_id, "event": event, **header, "attributes": {}}
    return json.dumps({"header": h, "payload": payload if payload is not None else {}}, ensure_ascii=False,
                      separators=(",", ":"))  # fmt: skip


def task_failed(task_id: str, code: str, message: str) -> str:
    return _event(task_id, "task-failed", error_code=cloud_error_code(code), error_message=f"{code}: {message}")


@dataclass
class _Task:
    task_id: str
    request_id: str
    spec: RunTask
    chars: int = 0  # billed characters received
    sentences: list[str] = field(default_factory=list)


class _MarkedSocket:
    """The connection, with a ``sentence-synthesis`` event sent before each binary audio frame (as the cloud
    service does); everything else is the connection itself."""

    def __init__(self, ws: Any, session: "DashScopeSession") -> None:
        self._ws = ws
        self._session = session

    async def send(self, data: Any) -> None:
        if isinstance(data, (bytes, bytearray, memoryview)):
            marker = self._session._synthesis_marker()
            if marker is not None:
                await self._ws.send(marker)
        await self._ws.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)


class DashScopeSession(Session):
    """One WebSocket connection on the DashScope path: tasks one after another."""

    def __init__(self, server: "WorkerServer", ws: Any) -> None:
        super().__init__(server, _MarkedSocket(ws, self))
        self._tasks: dict[str, _Task] = {}  # request id -> task, until its last event

    # -- events out ------------------------------------------------------------------------------------
    async def _send_raw(self, text: str) -> None:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            pass

    def _active_task(self) -> _Task | None:
        return self._tasks.get(self.active.id) if self.active is not None else None

    def _synthesis_marker(self) -> str | None:
        task = self._active_task()
        if task is None:
            return None
        out = {"sentence": {"index": max(0, len(task.sentences) - 1), "words": []}, "type": "sentence-synthesis"}
        return _event(task.task_id, "result-generated", {"output": out})

    async def _send_event(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        rid = event.get("request_id")
        if etype == "started":
            task = self._tasks[rid]
            req = self.active
            if req is not None and req.id == rid:  # the pump has not run yet: its encoder can still be chosen
                spec = task.spec
                req.encoder = AudioEncoder(self.server.engine.sample_rate, spec.sample_rate, spec.format, spec.gain)
            await self._send_raw(_event(task.task_id, "task-started"))
        elif etype == "finished":
            task = self._tasks.pop(rid, None)
            if task is None:
                return
            total = 0
            for i, text in enumerate(task.sentences):
                total += billed_characters(text)
                out = {"sentence": {"index": i, "words": []}, "type": "sentence-end", "original_text": text}
                await self._send_raw(_event(task.task_id, "result-generated",
                                            {"output": out, "usage": {"characters": total}}))  # fmt: skip
            await self._send_raw(_event(task.task_id, "task-finished",
                                        {"output": {}, "usage": {"characters": task.chars}}))  # fmt: skip
        elif etype == "cancelled":
            task = self._tasks.pop(rid, None)
            if task is not None:
                await self._send_raw(_event(task.task_id, "task-finished",
                                            {"output": {}, "usage": {"characters": task.chars}}))  # fmt: skip

    async def _send_error(self, code: str, message: str, *, request_ended: bool = False,
                          request_id: str | None = None) -> None:  # fmt: skip
        """Every error the base session reports ends the task (it is only called with request_ended=True for an
        active request; errors in answer to a start come through _on_message)."""
        self.server.metrics.errors.labels(code).inc()
        rid = request_id if request_id is not None else (self.active.id if self.active else None)
        task = self._tasks.pop(rid, None) if rid is not None else None
        await self._send_raw(task_failed(task.task_id if task else "", code, message))

    async def _fail_task(self, task_id: str | None, code: str, message: str) -> None:
        """A bad message: the running task (if any) ends with task-failed; without one, the message's task_id
        gets the task-failed."""
        req = self.active
        task = self._active_task()
        if req is not None and task is not None and not (code == P.REQUEST_ACTIVE and task_id != task.task_id):
            await self._abort(req, "error", error=code)
            self._tasks.pop(req.id, None)
            self.server.metrics.errors.labels(code).inc()
            await self._send_raw(task_failed(task.task_id, code, message))
            return
        self.server.metrics.errors.labels(code).inc()
        await self._send_raw(task_failed(task_id or "", code, message))

    # -- messages in -----------------------------------------------------------------------------------
    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, (bytes, bytearray, memoryview)):
            await self._fail_task(None, P.BINARY_NOT_ALLOWED, "binary frames are not accepted; send JSON text frames")
            return
        if len(message) > self.cfg.max_frame_bytes or len(message.encode("utf-8")) > self.cfg.max_frame_bytes:
            await self._fail_task(None, P.FRAME_TOO_LARGE, f"frame larger than {self.cfg.max_frame_bytes} bytes")
            return
        task_id: str | None = None
        try:
            try:
                msg = json.loads(message)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise P.ProtocolError(P.INVALID_JSON, f"not valid JSON: {exc}") from None
            if isinstance(msg, dict) and isinstance(msg.get("header"), dict):
                tid = msg["header"].get("task_id")
                task_id = tid if isinstance(tid, str) and 0 < len(tid) <= MAX_TASK_ID else None
            _, action, task_id = parse_header(msg)
            if action == RUN_TASK:
                await self._run_task(msg, task_id)
            elif action == CONTINUE_TASK:
                await self._continue_task(msg, task_id)
            else:
                await self._finish_task(msg, task_id)
        except P.ProtocolError as exc:
            await self._fail_task(task_id, exc.code, exc.message)
        except ConnectionClosed:
            raise
        except Exception:  # noqa: BLE001 - a bug: end the task, keep the connection and the worker
            log.exception("internal error handling a DashScope message")
            await self._fail_task(task_id, P.INTERNAL, "internal error")

    def _check_task(self, task_id: str) -> _Task:
        task = self._active_task()
        if task is None:
            raise P.ProtocolError(P.NO_ACTIVE_REQUEST, "no running task on this connection; send run-task first")
        if task_id != task.task_id:
            raise _bad("header.task_id", f"{task_id!r} is not the running task {task.task_id!r}")
        return task

    async def _run_task(self, msg: dict, task_id: str) -> None:
        srv = self.server
        if self.active is not None:
            raise P.ProtocolError(P.REQUEST_ACTIVE, f"task {self._tasks[self.active.id].task_id} is still running "
                                  "on this connection; finish or cancel it first")  # fmt: skip
        spec = parse_run_task(msg, task_id)
        if srv.ready and srv.engine is not None and not srv.draining:
            unknown = unknown_voice_message(srv.engine, spec.voice)
            if unknown:
                raise P.ProtocolError(P.UNKNOWN_VOICE, unknown)
        if spec.text:
            self._check_ssml(spec, spec.text)
        rid = task_id if P._REQUEST_ID_RE.match(task_id) else uuid.uuid4().hex
        task = _Task(task_id, rid, spec)
        start = {
            "type": "start", "voice": spec.voice, "speed": spec.speed, "format": "pcm", "sample_rate": spec.sample_rate,
            "seed": spec.seed, "request_id": rid,
        }  # fmt: skip
        if srv.engine is not None:
            start["mode"] = pick_mode(srv.engine, spec.voice, spec.instruction)
            if spec.instruction:
                start["instruct_text"] = spec.instruction
        self._tasks[rid] = task
        try:
            await self._on_start(start)
        except BaseException:
            if self.active is None or self.active.id != rid:
                self._tasks.pop(rid, None)
            raise
        if spec.text and self.active is not None and self.active.id == rid:
            task.chars += billed_characters(spec.text)
            await self._on_text({"type": "text", "text": spec.text})

    async def _continue_task(self, msg: dict, task_id: str) -> None:
        inp = _input(_payload(msg))
        text = _opt_text(inp)
        flush = inp.get("flush", False)
        if flush is not None and not isinstance(flush, bool):
            raise _bad("payload.input.flush", "must be a boolean")
        task = self._check_task(task_id)
        if text:
            self._check_ssml(task.spec, text)
            task.chars += billed_characters(text)
            await self._on_text({"type": "text", "text": text})
        if flush and self.active is not None and self._active_task() is task:
            await self._on_flush({})

    async def _finish_task(self, msg: dict, task_id: str) -> None:
        inp = _input(_payload(msg))
        directive = inp.get("directive")
        if directive not in (None, "cancel"):
            raise _unsupported(f"payload.input.directive {directive!r} is not supported; only \"cancel\"")
        if directive == "cancel" and self.active is None:
            return  # the task already ended (its task-finished crossed the cancel): nothing to answer
        task = self._check_task(task_id)
        if directive == "cancel":
            await self._on_cancel({})  # -> `cancelled` -> task-finished
            return
        text = _opt_text(inp)
        if text:
            self._check_ssml(task.spec, text)
            task.chars += billed_characters(text)
            await self._on_text({"type": "text", "text": text})
            if self._active_task() is not task:
                return  # the text ended the task (too long)
        await self._on_end({})

    @staticmethod
    def _check_ssml(spec: RunTask, text: str) -> None:
        if spec.enable_ssml and text.lstrip().startswith("<speak"):
            raise _unsupported("SSML is not supported by this worker; send plain text")

    async def _push(self, req: Any, segments: list[str]) -> bool:
        ok = await super()._push(req, segments)
        task = self._tasks.get(req.id)
        if ok and task is not None:
            for seg in segments:
                out = {"sentence": {"index": len(task.sentences), "words": []}, "type": "sentence-begin",
                       "original_text": seg}  # fmt: skip
                task.sentences.append(seg)
                await self._send_raw(_event(task.task_id, "result-generated", {"output": out}))
        return ok


__all__ = ["DashScopeSession", "PATHS", "parse_run_task", "parse_header", "RunTask", "cloud_error_code"]
