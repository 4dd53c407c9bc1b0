"""Client for the worker's WebSocket protocol (docs/protocol.md), and its CLI.

    python -m cosyvoice_tts.client --text "Hello there." --out hello.wav
    python -m cosyvoice_tts.client --simulate-stream --text "..."      # LLM-paced fragments
    python -m cosyvoice_tts.client --test-interrupt                     # cancel mid-stream, then reuse
    python -m cosyvoice_tts.client --list-voices

``--url`` defaults to the load balancer, ``ws://127.0.0.1:8080/ws``. Prints a short summary (``--json``: one
JSON object per line) and exits non-zero on any failure. The library part (:class:`Connection`,
:func:`llm_fragments`) depends only on ``websockets``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import wave
from dataclasses import dataclass, field
from typing import Any, Iterable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
AUTH_TOKEN_ENV = "COSYVOICE_TTS_AUTH_TOKEN"
DEFAULT_TEXT = "Hello! This is CosyVoice two, streaming speech as the text arrives. How does it sound?"
LONG_TEXT = (
    "This is a deliberately long passage, written so that synthesis is still running when the client "
    "interrupts it. It goes on about the weather, the sea, the mountains and the long road home, sentence "
    "after sentence, so that there is always more audio to come. Then it goes on some more, because a test of "
    "interruption needs a request that would not finish on its own before the cancel arrives. "
)

_FRAGMENT_RE = re.compile(
    r"\s*[\u3400-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]{1,2}"  # CJK: one or two characters per token
    r"|\s*[A-Za-z\u00c0-\u024f']{1,5}"  # Latin: words in pieces of up to 5 letters, leading space kept
    r"|\s*\d{1,3}"  # numbers in pieces of up to 3 digits
    r"|\s*[^\sA-Za-z\d]"  # punctuation, symbols, emoji: one at a time
    r"|\s+",  # trailing whitespace
    re.S,
)


def llm_fragments(text: str) -> list[str]:
    """Split text the way an LLM streams it: sub-word tokens with their leading space. Joins back to ``text``."""
    parts = _FRAGMENT_RE.findall(text)
    assert "".join(parts) == text
    return parts


class ClientError(Exception):
    pass


@dataclass
class Result:
    """What one request produced, with client-side timings (seconds, time.monotonic())."""

    ok: bool = False
    request_id: str | None = None
    worker: str | None = None
    sample_rate: int = 24000
    audio: bytearray = field(default_factory=bytearray)
    frames: int = 0
    outcome: str = "none"  # finished | cancelled | error | closed | timeout
    error_code: str | None = None
    error_message: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    t_send_start: float | None = None
    t_first_text: float | None = None
    t_text_end: float | None = None
    t_first_audio: float | None = None
    t_done: float | None = None
    frames_after_cancel: int = 0
    t_cancel: float | None = None

    @property
    def audio_s(self) -> float:
        return len(self.audio) / 2 / self.sample_rate

    def ms(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) * 1000.0, 1)

    @property
    def first_audio_ms(self) -> float | None:
        """First audio relative to the first text sent."""
        return self.ms(self.t_first_text, self.t_first_audio)

    def summary(self) -> dict[str, Any]:
        d = {
            "ok": self.ok,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "worker": self.worker,
            "audio_s": round(self.audio_s, 3),
            "frames": self.frames,
            "first_audio_ms": self.first_audio_ms,
            "first_audio_after_text_end_ms": self.ms(self.t_text_end, self.t_first_audio),
            "total_ms": self.ms(self.t_send_start, self.t_done),
            "server_stats": self.stats,
        }
        if self.error_code:
            d["error"] = {"code": self.error_code, "message": self.error_message}
        return d


def _auth_headers(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token else None


class Connection:
    """One WebSocket connection to a worker (or the load balancer). Requests run one after another."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.open_timeout = open_timeout
        self.ws: Any = None

    async def __aenter__(self) -> "Connection":
        try:
            self.ws = await connect(
                self.url,
                additional_headers=_auth_headers(self.token),
                open_timeout=self.open_timeout,
                max_size=64 * 1024 * 1024,
                compression=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip()
            raise ClientError(f"{self.url}: HTTP {status} {body}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise ClientError(f"{self.url}: cannot connect: {exc}") from None
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg, ensure_ascii=False))

    async def recv_event(self, timeout: float) -> dict[str, Any]:
        """Next JSON event, skipping nothing (binary frames are an error here)."""
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(msg, bytes):
            raise ClientError("unexpected binary frame")
        return json.loads(msg)

    async def voices(self, timeout: float = 10.0) -> list[str]:
        await self.send({"type": "voices"})
        ev = await self.recv_event(timeout)
        if ev.get("type") != "voices":
            raise ClientError(f"unexpected answer to 'voices': {ev}")
        return list(ev.get("voices") or [])

    async def synthesize(
        self,
        *,
        voice: str,
        text: str | None = None,
        fragments: Iterable[str] | None = None,
        interval: float = 0.04,
        cancel_after_audio_s: float | None = None,
        grace: float = 0.5,
        timeout: float = 120.0,
        **params: Any,
    ) -> Result:
        """Run one request. ``text``: whole text in ``start`` (``end: true``); ``fragments``: ``text`` messages
        every ``interval`` s, then ``end``. ``cancel_after_audio_s``: send ``cancel`` once that much audio came,
        then watch ``grace`` s for stray audio frames (counted in ``frames_after_cancel``)."""
        res = Result()
        start: dict[str, Any] = {"type": "start", "voice": voice}
        start.update({k: v for k, v in params.items() if v is not None})
        if text is not None:
            start["text"] = text
            start["end"] = True
        res.t_send_start = time.monotonic()
        await self.send(start)
        if text is not None:
            res.t_first_text = res.t_text_end = res.t_send_start
        feeder: asyncio.Task | None = None
        deadline = time.monotonic() + timeout
        try:
            ev = await self.recv_event(timeout)
            if ev.get("type") == "error":
                res.outcome, res.error_code, res.error_message = "error", ev.get("code"), ev.get("message")
                res.t_done = time.monotonic()
                return res
            if ev.get("type") != "started":
                raise ClientError(f"expected 'started', got {ev}")
            res.request_id = ev.get("request_id")
            res.worker = ev.get("worker")
            res.sample_rate = int(ev.get("sample_rate") or 24000)
            if fragments is not None:
                feeder = asyncio.create_task(self._feed(res, list(fragments), interval))
            while True:
                left = deadline - time.monotonic()
                if res.t_cancel is not None:
                    left = min(left, res.t_cancel + 30.0 - time.monotonic())
                if left <= 0:
                    res.outcome = "timeout"
                    break
                msg = await asyncio.wait_for(self.ws.recv(), left)
                if isinstance(msg, bytes):
                    if res.t_first_audio is None:
                        res.t_first_audio = time.monotonic()
                    res.audio += msg
                    res.frames += 1
                    if (cancel_after_audio_s is not None and res.t_cancel is None
                            and res.audio_s >= cancel_after_audio_s):  # fmt: skip
                        if feeder is not None:
                            feeder.cancel()
                        res.t_cancel = time.monotonic()
                        await self.send({"type": "cancel"})
                    continue
                ev = json.loads(msg)
                kind = ev.get("type")
                if kind == "finished":
                    res.outcome, res.stats, res.ok = "finished", ev.get("stats") or {}, True
                    break
                if kind == "cancelled":
                    res.outcome = "cancelled"
                    res.ok = res.t_cancel is not None
                    break
                if kind == "error":
                    res.error_code, res.error_message = ev.get("code"), ev.get("message")
                    if ev.get("request_ended") or ev.get("request_id") is None:
                        res.outcome = "error"
                        break
        except asyncio.TimeoutError:
            res.outcome = "timeout"
        except ConnectionClosed as exc:
            res.outcome = "closed"
            res.error_message = f"connection closed: {exc}"
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
        res.t_done = time.monotonic()
        if res.outcome == "cancelled" and grace > 0:
            # nothing of this request may follow `cancelled`
            end = time.monotonic() + grace
            while (left := end - time.monotonic()) > 0:
                try:
                    msg = await asyncio.wait_for(self.ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                except ConnectionClosed:
                    break
                if isinstance(msg, bytes):
                    res.frames_after_cancel += 1
        if res.outcome == "finished" and not res.audio:
            res.ok = False
            res.error_message = "finished without audio"
        return res

    async def _feed(self, res: Result, fragments: list[str], interval: float) -> None:
        try:
            for i, frag in enumerate(fragments):
                if i:
                    await asyncio.sleep(interval)
                await self.send({"type": "text", "text": frag})
                if res.t_first_text is None:
                    res.t_first_text = time.monotonic()
            await self.send({"type": "end"})
            res.t_text_end = time.monotonic()
        except ConnectionClosed:
            pass


def write_wav(path: str, pcm: bytes, sample_rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)


# -- CLI ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cosyvoice_tts.client", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help=f"worker or load balancer WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--token", default=None, help=f"bearer token (default: env {AUTH_TOKEN_ENV})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--simulate-stream", action="store_true",
                      help="send the text as LLM-paced fragments; report first audio relative to the first text")
    mode.add_argument("--test-interrupt", action="store_true",
                      help="start a long text, cancel mid-stream, check that audio stops and the connection works")
    mode.add_argument("--list-voices", action="store_true", help="print the worker's voices")
    p.add_argument("--text", default=None, help="text to speak (default: a short sample)")
    p.add_argument("--out", default=None, help="write the audio to this WAV file")
    p.add_argument("--voice", default=None, help="voice id (default: the worker's first voice)")
    p.add_argument("--mode", default=None, choices=("sft", "zero_shot", "cross_lingual", "instruct2"))
    p.add_argument("--instruct-text", default=None)
    p.add_argument("--speed", type=float, default=None)
    p.add_argument("--sample-rate", type=int, default=None, help="output sample rate (default: the model's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fragment-interval-ms", type=float, default=40.0,
                   help="pause between fragments with --simulate-stream (default 40 ms, about 25 tokens/s)")
    p.add_argument("--cancel-after", type=float, default=0.2,
                   help="--test-interrupt: cancel once this many seconds of audio arrived (default 0.2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--json", action="store_true", help="print JSON summaries")
    return p


def _params(a: argparse.Namespace) -> dict[str, Any]:
    return {"mode": a.mode, "instruct_text": a.instruct_text, "speed": a.speed, "sample_rate": a.sample_rate,
            "seed": a.seed}  # fmt: skip


def _print(a: argparse.Namespace, label: str, d: dict[str, Any]) -> None:
    if a.json:
        print(json.dumps({"check": label, **d}, ensure_ascii=False), flush=True)
        return
    parts = [f"{label}: {'ok' if d.get('ok') else 'FAILED'}"]
    for key in ("outcome", "request_id", "worker", "audio_s", "first_audio_ms", "first_audio_after_text_end_ms",
                "total_ms", "cancel_ack_ms", "frames_after_cancel", "follow_up", "out"):
        if d.get(key) is not None:
            parts.append(f"{key}={d[key]}")
    st = d.get("server_stats") or {}
    if st.get("rtf") is not None:
        parts.append(f"rtf={st['rtf']}")
    if d.get("error"):
        parts.append(f"error={d['error'].get('code')}: {d['error'].get('message')}")
    print(" ".join(parts), flush=True)


async def _run(a: argparse.Namespace) -> int:
    token = a.token if a.token is not None else os.environ.get(AUTH_TOKEN_ENV)
    async with Connection(a.url, token) as conn:
        if a.list_voices:
            voices = await conn.voices()
            print(json.dumps(voices, ensure_ascii=False) if a.json else "\n".join(voices))
            return 0 if voices else 1
        voice = a.voice
        if voice is None:
            voices = await conn.voices()
            if not voices:
                raise ClientError("the worker has no voices")
            voice = voices[0]
        if a.test_interrupt:
            return await _interrupt(a, conn, voice)
        text = a.text if a.text is not None else DEFAULT_TEXT
        if a.simulate_stream:
            res = await conn.synthesize(voice=voice, fragments=llm_fragments(text),
                                        interval=a.fragment_interval_ms / 1000.0, timeout=a.timeout, **_params(a))
            label = "stream"
        else:
            res = await conn.synthesize(voice=voice, text=text, timeout=a.timeout, **_params(a))
            label = "synthesis"
        d = res.summary()
        if a.out and res.audio:
            write_wav(a.out, bytes(res.audio), res.sample_rate)
            d["out"] = a.out
        _print(a, label, d)
        return 0 if res.ok else 1


async def _interrupt(a: argparse.Namespace, conn: Connection, voice: str) -> int:
    text = a.text if a.text is not None else LONG_TEXT * 3
    res = await conn.synthesize(voice=voice, text=text, cancel_after_audio_s=a.cancel_after, timeout=a.timeout,
                                **_params(a))  # fmt: skip
    d = res.summary()
    d["cancel_ack_ms"] = res.ms(res.t_cancel, res.t_done)
    d["frames_after_cancel"] = res.frames_after_cancel
    problems = []
    if res.outcome != "cancelled":
        detail = f" ({res.error_code}: {res.error_message})" if res.error_code else ""
        problems.append(f"expected 'cancelled', got {res.outcome}{detail}")
    if res.frames_after_cancel:
        problems.append(f"{res.frames_after_cancel} audio frame(s) after 'cancelled'")
    follow = await conn.synthesize(voice=voice, text="Short follow-up.", timeout=a.timeout, **_params(a))
    d["follow_up"] = f"{follow.outcome} {follow.audio_s:.2f}s"
    if not follow.ok:
        problems.append(f"follow-up request on the same connection: {follow.outcome} {follow.error_code or ''}")
    d["ok"] = not problems
    if problems:
        d["error"] = {"code": "interrupt_check", "message": "; ".join(problems)}
    _print(a, "interrupt", d)
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(a))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConnectionClosed as exc:
        print(f"error: connection closed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
