"""Live progress on stderr: a bar (or periodic lines when stderr is not a terminal) with running stats."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from . import stats


class Progress:
    def __init__(self, total: int | None = None, duration: float | None = None, label: str = "",
                 stream: TextIO | None = None, interval: float | None = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.duration = duration
        self.label = label
        self.interval = interval if interval is not None else (0.5 if self.tty else 5.0)
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.done = 0
        self.counts = {"ok": 0, "busy": 0, "error": 0, "dropped": 0}
        self.first_ms: list[float] = []
        self.rtf: list[float] = []
        self.audio_s = 0.0
        self._task: asyncio.Task | None = None

    def add(self, rec) -> None:
        r = rec if isinstance(rec, dict) else rec.to_dict()
        self.done += 1
        self.counts[r["outcome"]] = self.counts.get(r["outcome"], 0) + 1
        if r["outcome"] == "ok":
            if r.get("first_chunk_ms") is not None:
                self.first_ms.append(r["first_chunk_ms"])
            if r.get("rtf") is not None:
                self.rtf.append(r["rtf"])
            self.audio_s += r.get("audio_s") or 0.0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if self.total:
            frac = min(self.done / self.total, 1.0)
            count = f"{self.done}/{self.total}"
        elif self.duration:
            frac = min(elapsed / self.duration, 1.0)
            count = f"{self.done} req"
        else:
            frac, count = 0.0, f"{self.done} req"
        width = 20
        filled = int(round(frac * width))
        bar = "#" * filled + "." * (width - filled)
        p50 = stats.percentile(self.first_ms, 50)
        p95 = stats.percentile(self.first_ms, 95)
        rtf50 = stats.percentile(self.rtf, 50)
        fails = self.done - self.counts["ok"]
        parts = [
            f"{self.label}[{bar}] {count}",
            f"first p50 {_ms(p50)} p95 {_ms(p95)}",
            f"rtf p50 {rtf50:.2f}" if rtf50 is not None else "rtf p50 -",
            f"{self.counts['ok'] / elapsed if elapsed > 0 else 0:.1f} req/s",
            f"{self.audio_s / elapsed if elapsed > 0 else 0:.1f} audio-s/s",
            f"errors {fails}" + (f" (busy {self.counts['busy']} err {self.counts['error']}"
                                 f" drop {self.counts['dropped']})" if fails else ""),
            f"{elapsed:.0f}s",
        ]
        return " | ".join(parts)

    def render(self, final: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.render()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        if self.enabled:
            self._task = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.render(final=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"
