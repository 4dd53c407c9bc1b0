"""One synthesis request: the caller's handle and the engine's per-request state.

The caller's side (`push_text`, `end_text`, `cancel`, iteration over audio) is thread-safe and never touches the
model: it only leaves messages in the request's inbox and reads its outbox. The engine thread owns everything
else (LM programme, KV slot, streaming caches), so nothing is shared between requests.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import numpy as np

from .errors import EngineError

_ids = itertools.count(1)


@dataclass
class SynthesisParams:
    voice: str
    mode: str = "sft"  # sft | zero_shot | cross_lingual | instruct2
    instruct_text: str | None = None
    speed: float = 1.0
    seed: int | None = None
    stream: bool = True
    request_id: str | None = None


class Outbox:
    """Audio chunks and the final event, readable from threads and from asyncio alike."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, item: tuple[str, Any]) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def get(self, timeout: float | None = None) -> tuple[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no output within the timeout")
            return self._items.popleft()

    async def aget(self) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                event = asyncio.Event()
                self._waiters.append((loop, event))
            await event.wait()


@dataclass
class RequestStats:
    submitted_at: float = field(default_factory=time.monotonic)
    text_ended_at: float | None = None
    first_chunk_at: float | None = None
    # Where the first chunk's time goes: LM has its tokens, then the vocoder takes the chunk.
    first_tokens_at: float | None = None
    first_vocode_at: float | None = None
    # Engine steps (LM forwards of the whole batch) at admission and when the first chunk's tokens were ready: a
    # first chunk needs ~28 of this request's own; more means steps it sat out, slow ones mean a slow loop.
    admitted_step: int | None = None
    first_tokens_step: int | None = None
    finished_at: float | None = None
    audio_samples: int = 0
    text_tokens: int = 0
    speech_tokens: int = 0
    chars: int = 0
    outcome: str = "running"  # running | ok | cancelled | error


class Request:
    def __init__(self, params: SynthesisParams, sample_rate: int, wake: threading.Event):
        self.id = params.request_id or f"req-{next(_ids)}"
        self.params = params
        self.sample_rate = sample_rate
        self.stats = RequestStats()
        self.outbox = Outbox()
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = wake
        self._text_closed = False
        self.cancelled = False
        # --- engine-thread state (see engine.py) ---
        self.slot: int | None = None
        self.position = 0
        self.program = None
        self.stream = None
        self.segments: deque[str] = deque()
        self.bistream = False
        self.generator = None
        self.error: EngineError | None = None
        self.vocoding = False  # a chunk of this request is with the vocoder worker

    # --- caller side ----------------------------------------------------------------
    def push_text(self, text: str) -> None:
        with self._lock:
            if self._text_closed:
                raise EngineError("invalid_request", "text pushed after end of text")
            self._inbox.append(("text", text))
            self.stats.chars += len(text)
        self._wake.set()

    def end_text(self) -> None:
        with self._lock:
            if self._text_closed:
                return
            self._text_closed = True
            self._inbox.append(("end", None))
            self.stats.text_ended_at = time.monotonic()
        self._wake.set()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
        self._wake.set()

    def take_inbox(self) -> list[tuple[str, Any]]:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        return items

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            kind, value = self.outbox.get()
            if kind == "audio":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        while True:
            kind, value = await self.outbox.aget()
            if kind == "audio":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def audio(self) -> np.ndarray:
        """Block until done and return all audio (tests, CLI)."""
        parts = list(self)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @property
    def summary(self) -> dict:
        s = self.stats
        audio_s = s.audio_samples / self.sample_rate
        end = s.finished_at or time.monotonic()
        wall = end - s.submitted_at
        return {
            "request_id": self.id,
            "voice": self.params.voice,
            "mode": self.params.mode,
            "chars": s.chars,
            "text_tokens": s.text_tokens,
            "speech_tokens": s.speech_tokens,
            "first_chunk_ms": None if s.first_chunk_at is None else round((s.first_chunk_at - s.submitted_at) * 1000, 1),
            "first_chunk_after_text_end_ms": None if s.first_chunk_at is None or s.text_ended_at is None
            else round(max(0.0, s.first_chunk_at - s.text_ended_at) * 1000, 1),
            "audio_s": round(audio_s, 3),
            "wall_s": round(wall, 3),
            "rtf": round(wall / audio_s, 4) if audio_s > 0 else None,
            "outcome": s.outcome,
            **self.first_chunk_phases(),
        }

    def first_chunk_phases(self) -> dict:
        """The first chunk's latency in three parts (ms): the LM producing its tokens, waiting for the vocoder,
        and the vocoder (flow + HiFT) itself."""
        s = self.stats
        stamps = (s.submitted_at, s.first_tokens_at, s.first_vocode_at, s.first_chunk_at)
        if any(t is None for t in stamps):
            return {}
        lm, queue, vocoder = (round((b - a) * 1000, 1) for a, b in zip(stamps, stamps[1:]))
        phases = {"first_chunk_lm_ms": lm, "first_chunk_queue_ms": queue, "first_chunk_vocoder_ms": vocoder}
        if s.admitted_step is not None and s.first_tokens_step is not None:
            phases["first_chunk_lm_steps"] = s.first_tokens_step - s.admitted_step
        return phases
