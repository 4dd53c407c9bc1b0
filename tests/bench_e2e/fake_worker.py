"""TEST DOUBLE: a tiny WebSocket server speaking the worker protocol of docs/protocol.md.

It is not the real worker and synthesises no speech: it sends silent PCM on a schedule the test chooses,
so the bench's timing, stall detection and outcome handling can be checked against known timelines.
It runs its own event loop in a thread, so the bench's synchronous `main()` can be driven against it.

Behaviour by voice:
  "default"  audio of `audio_per_char` s per character, in chunks of `chunk_s` every `interval` s
  "stall"    chunks of 0.05 s of audio every 0.25 s (each gap outlasts what is buffered: a stall each)
  "drop"     one chunk, then the connection is closed without `finished`
  "hang"     `started`, then nothing (the client's request timeout must end it)
  "internal" an `internal` error
  other      an `unknown_voice` error
More than `max_sessions` active requests: a `busy` error.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from http import HTTPStatus

from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Response

VOICES = ("default", "stall", "drop", "hang", "internal")


class FakeWorker:
    def __init__(self, name: str = "fake-0", sample_rate: int = 24000, max_sessions: int = 4,
                 first_delay: float = 0.05, chunk_s: float = 0.2, interval: float = 0.01,
                 audio_per_char: float = 0.02):
        self.name, self.sample_rate, self.max_sessions = name, sample_rate, max_sessions
        self.first_delay, self.chunk_s, self.interval = first_delay, chunk_s, interval
        self.audio_per_char = audio_per_char
        self.active = 0
        self.outcomes: Counter = Counter()
        self.audio_samples = 0          # samples sent in requests that finished
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()

    # ---- lifecycle (a thread with its own loop) ----
    def start(self) -> "FakeWorker":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake worker did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, process_request=self._http,
                         compression=None, max_size=2 ** 20) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stopped.wait()

    # ---- HTTP: /metrics ----
    def metrics_text(self) -> str:
        lines = ["# HELP fake_requests_total Requests by outcome.", "# TYPE fake_requests_total counter"]
        for outcome in ("ok", "busy", "error", "cancelled", "dropped"):
            lines.append(f'fake_requests_total{{outcome="{outcome}"}} {self.outcomes[outcome]}')
        lines += ["# HELP fake_audio_seconds_total Audio produced.", "# TYPE fake_audio_seconds_total counter",
                  f"fake_audio_seconds_total {self.audio_samples / self.sample_rate}"]
        return "\n".join(lines) + "\n"

    def _http(self, connection, request):
        if request.path == "/metrics":
            body = self.metrics_text().encode()
            return Response(HTTPStatus.OK, "OK", Headers([("Content-Type", "text/plain; version=0.0.4"),
                                                          ("Content-Length", str(len(body)))]), body)
        if request.path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    # ---- the protocol ----
    async def _handler(self, ws) -> None:
        req: dict | None = None
        producer: asyncio.Task | None = None
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    await self._error(ws, "binary_not_allowed", "binary frames are not accepted")
                    continue
                try:
                    m = json.loads(msg)
                except json.JSONDecodeError:
                    await self._error(ws, "invalid_json", "not JSON")
                    continue
                t = m.get("type")
                if t == "voices":
                    await ws.send(json.dumps({"type": "voices", "voices": list(VOICES), "worker": self.name}))
                elif t == "start":
                    if req is not None and not req["done"].is_set():
                        await self._error(ws, "request_active", "a request is active", req["id"])
                        continue
                    voice = m.get("voice")
                    if voice not in VOICES:
                        self.outcomes["error"] += 1
                        await self._error(ws, "unknown_voice", f"unknown voice {voice!r}", m.get("request_id"))
                        continue
                    if voice == "internal":
                        self.outcomes["error"] += 1
                        await self._error(ws, "internal", "boom", m.get("request_id"))
                        continue
                    if self.active >= self.max_sessions:
                        self.outcomes["busy"] += 1
                        await self._error(ws, "busy", "too many sessions", m.get("request_id"))
                        continue
                    self.active += 1
                    req = {"id": m.get("request_id") or "r", "voice": voice, "text": m.get("text") or "",
                           "ended": bool(m.get("end")), "done": asyncio.Event(), "wake": asyncio.Event(),
                           "chars": 0, "wav": m.get("format") == "wav"}
                    await ws.send(json.dumps({"type": "started", "request_id": req["id"],
                                              "sample_rate": self.sample_rate,
                                              "format": "wav" if req["wav"] else "pcm",
                                              "worker": self.name}))
                    producer = asyncio.create_task(self._produce(ws, req))
                elif t in ("text", "end", "flush"):
                    if req is None or req["done"].is_set():
                        await self._error(ws, "no_active_request", "no active request")
                        continue
                    if t == "text":
                        req["text"] += m.get("text", "")
                    elif t == "end":
                        req["ended"] = True
                    req["wake"].set()
                elif t == "cancel":
                    if producer is not None and not producer.done():
                        producer.cancel()
                        self.outcomes["cancelled"] += 1
                        await ws.send(json.dumps({"type": "cancelled", "request_id": req["id"]}))
                else:
                    await self._error(ws, "unknown_type", f"unknown type {t!r}")
        finally:
            if producer is not None and not producer.done():
                producer.cancel()
                self.outcomes["dropped"] += 1

    async def _error(self, ws, code, message, request_id=None) -> None:
        ev = {"type": "error", "code": code, "message": message}
        if request_id:
            ev["request_id"] = request_id
        await ws.send(json.dumps(ev))

    async def _produce(self, ws, req: dict) -> None:
        sr = self.sample_rate
        sent = 0
        try:
            if req["voice"] == "hang":
                await asyncio.Event().wait()
            await asyncio.sleep(self.first_delay)
            if req["voice"] == "drop":
                await ws.send(bytes(2 * int(0.1 * sr)))
                self.outcomes["dropped"] += 1
                await ws.close()
                return
            chunk_s, interval = (0.05, 0.25) if req["voice"] == "stall" else (self.chunk_s, self.interval)
            spoken = 0  # characters turned into audio
            first = True
            while True:
                # synthesise what is buffered once enough text is there (or at end of text)
                while len(req["text"]) - spoken < 8 and not req["ended"]:
                    req["wake"].clear()
                    await req["wake"].wait()
                n = len(req["text"]) - spoken
                spoken += n
                samples = int(round(n * self.audio_per_char * sr))
                step = int(round(chunk_s * sr))
                while samples > 0:
                    k = min(step, samples)
                    if not first:
                        await asyncio.sleep(interval)
                    first = False
                    header = b"RIFF" + bytes(40) if req["wav"] and sent == 0 else b""  # 44 bytes
                    await ws.send(header + bytes(2 * k))
                    sent += k
                    samples -= k
                if req["ended"] and spoken == len(req["text"]):
                    break
            self.audio_samples += sent
            self.outcomes["ok"] += 1
            await ws.send(json.dumps({"type": "finished", "request_id": req["id"], "stats": {
                "first_chunk_ms": self.first_delay * 1000, "audio_s": sent / sr, "rtf": 0.0,
                "chars": len(req["text"]), "worker": self.name}}))
        finally:
            self.active -= 1
            req["done"].set()
