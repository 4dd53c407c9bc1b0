"""Wire protocol of the worker's `/ws` endpoint: message parsing, validation, error codes.

See docs/protocol.md. Everything here is pure (no I/O), so it is unit-tested directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# Stable error codes (docs/protocol.md lists them with their meaning).
INVALID_JSON = "invalid_json"
UNKNOWN_TYPE = "unknown_type"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
FRAME_TOO_LARGE = "frame_too_large"
BINARY_NOT_ALLOWED = "binary_not_allowed"
UNKNOWN_VOICE = "unknown_voice"
NO_ACTIVE_REQUEST = "no_active_request"
REQUEST_ACTIVE = "request_active"
TEXT_ENDED = "text_ended"
TIMEOUT = "timeout"
BUSY = "busy"
DRAINING = "draining"
NOT_READY = "not_ready"
UNAUTHORIZED = "unauthorized"
INTERNAL = "internal"

ERROR_CODES = (
    INVALID_JSON, UNKNOWN_TYPE, MISSING_FIELD, INVALID_FIELD, EMPTY_TEXT, TEXT_TOO_LONG, FRAME_TOO_LARGE,
    BINARY_NOT_ALLOWED, UNKNOWN_VOICE, NO_ACTIVE_REQUEST, REQUEST_ACTIVE, TEXT_ENDED, TIMEOUT, BUSY, DRAINING,
    NOT_READY, UNAUTHORIZED, INTERNAL,
)  # fmt: skip

MESSAGE_TYPES = ("start", "text", "flush", "end", "cancel", "voices")
MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")
FORMATS = ("pcm", "wav")
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
SPEED_RANGE = (0.5, 2.0)
MAX_REQUEST_ID = 128
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,%d}$" % MAX_REQUEST_ID)


class ProtocolError(Exception):
    """A bad client message. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StartParams:
    voice: str
    mode: str = "sft"
    instruct_text: str | None = None
    speed: float = 1.0
    format: str = "pcm"
    sample_rate: int = 24000
    seed: int | None = None
    request_id: str | None = None
    text: str | None = None
    end: bool = False


def parse_message(data: str) -> dict[str, Any]:
    """Parse one text frame into a message dict with a known ``type``."""
    try:
        msg = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(INVALID_JSON, "a message must be a JSON object")
    if "type" not in msg:
        raise ProtocolError(MISSING_FIELD, "field 'type' is required")
    mtype = msg["type"]
    if not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {mtype!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    return msg


def _opt_str(msg: dict, key: str, max_len: int | None = None) -> str | None:
    v = msg.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ProtocolError(INVALID_FIELD, f"field {key!r} must be a string")
    if max_len is not None and len(v) > max_len:
        raise ProtocolError(INVALID_FIELD, f"field {key!r} is longer than {max_len} characters")
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_start(msg: dict[str, Any], *, default_sample_rate: int = 24000) -> StartParams:
    """Validate a ``start`` message."""
    if "voice" not in msg or msg["voice"] is None:
        raise ProtocolError(MISSING_FIELD, "field 'voice' is required")
    voice = msg["voice"]
    if not isinstance(voice, str) or not voice.strip() or len(voice) > 256:
        raise ProtocolError(INVALID_FIELD, "field 'voice' must be a non-empty string (at most 256 characters)")
    mode = msg.get("mode", "sft")
    if mode is None:
        mode = "sft"
    if mode not in MODES:
        raise ProtocolError(INVALID_FIELD, f"field 'mode' must be one of {', '.join(MODES)}")
    instruct_text = _opt_str(msg, "instruct_text", 1000)
    if mode == "instruct2" and not (instruct_text and instruct_text.strip()):
        raise ProtocolError(MISSING_FIELD, "mode 'instruct2' needs a non-empty 'instruct_text'")
    speed = msg.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if not _is_number(speed) or not (SPEED_RANGE[0] <= float(speed) <= SPEED_RANGE[1]):
        raise ProtocolError(INVALID_FIELD, f"field 'speed' must be a number in [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}]")
    fmt = msg.get("format", "pcm")
    if fmt is None:
        fmt = "pcm"
    if fmt not in FORMATS:
        raise ProtocolError(INVALID_FIELD, f"field 'format' must be one of {', '.join(FORMATS)}")
    sr = msg.get("sample_rate", default_sample_rate)
    if sr is None or sr == 0:
        sr = default_sample_rate
    if not _is_number(sr) or int(sr) != sr or int(sr) not in SAMPLE_RATES:
        raise ProtocolError(INVALID_FIELD, f"field 'sample_rate' must be one of {', '.join(map(str, SAMPLE_RATES))}")
    seed = msg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ProtocolError(INVALID_FIELD, "field 'seed' must be a non-negative integer")
    request_id = msg.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id)):
        raise ProtocolError(
            INVALID_FIELD,
            f"field 'request_id' must be 1-{MAX_REQUEST_ID} characters of letters, digits and ._:@/+=-",
        )
    text = _opt_str(msg, "text")
    end = msg.get("end", False)
    if end is None:
        end = False
    if not isinstance(end, bool):
        raise ProtocolError(INVALID_FIELD, "field 'end' must be a boolean")
    return StartParams(
        voice=voice,
        mode=mode,
        instruct_text=instruct_text,
        speed=float(speed),
        format=fmt,
        sample_rate=int(sr),
        seed=seed,
        request_id=request_id,
        text=text,
        end=end,
    )


def parse_text(msg: dict[str, Any]) -> str:
    """Validate a ``text`` message; returns the fragment (may be whitespace, never empty)."""
    if "text" not in msg or msg["text"] is None:
        raise ProtocolError(MISSING_FIELD, "field 'text' is required")
    text = msg["text"]
    if not isinstance(text, str):
        raise ProtocolError(INVALID_FIELD, "field 'text' must be a string")
    if text == "":
        raise ProtocolError(EMPTY_TEXT, "field 'text' is empty")
    return text


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def error_event(code: str, message: str, request_id: str | None = None, request_ended: bool = False) -> str:
    ev: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        ev["request_id"] = request_id
        ev["request_ended"] = request_ended
    return dumps(ev)
