"""One bench request over the worker's WebSocket protocol (docs/protocol.md), timed."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

try:  # websockets >= 14: the asyncio implementation
    from websockets.asyncio.client import connect as ws_connect
except ImportError:  # pragma: no cover - older websockets
    ws_connect = websockets.connect

from . import stats

BYTES_PER_SAMPLE = 2  # 16-bit PCM mono
WAV_HEADER_BYTES = 44


@dataclass
class RequestOptions:
    mode: str = "text"                 # "text": whole text in `start`; "stream": LLM-like fragments
    voice: str = ""
    tts_mode: str | None = None        # the protocol's `mode` (sft, zero_shot, ...); None: worker default
    speed: float | None = None
    sample_rate: int | None = None     # None: the worker's default
    seed: int | None = None
    extra: dict = field(default_factory=dict)  # more `start` fields, verbatim
    token_rate: float = 40.0           # stream mode: fragments per second (an LLM's pace)
    request_timeout: float = 120.0     # whole request, from the first message to `finished`


@dataclass
class RequestResult:
    request_id: str
    session: int
    index: int                      # position in the run (0-based, in order of start)
    level: int | None               # sweep concurrency level, None outside a sweep
    text_chars: int
    mode: str
    outcome: str = "dropped"        # ok | busy | error | dropped
    error_code: str | None = None   # the worker's error code, or the reason the request was dropped
    error_message: str | None = None
    worker: str | None = None
    sample_rate: int | None = None
    t_start: float | None = None    # seconds since the run started: `start` sent
    t_end: float | None = None      # `finished` / error / drop seen
    connect_ms: float | None = None  # when this request had to open a connection
    first_chunk_ms: float | None = None           # first audio after the first text was sent
    first_chunk_after_end_ms: float | None = None  # first audio after end-of-text (negative: before)
    total_ms: float | None = None   # first text sent -> `finished`
    audio_s: float = 0.0
    rtf: float | None = None        # total time / audio seconds
    bytes: int = 0
    chunks: int = 0
    max_gap_ms: float | None = None
    stall_count: int = 0
    stall_total_ms: float = 0.0
    stall_max_ms: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    worker_stats: dict | None = None  # `finished.stats` as the worker sent it

    def to_dict(self) -> dict:
        return asdict(self)


class Connection:
    """A WebSocket connection that a session reuses for its requests (reopened after a failure)."""

    def __init__(self, url: str, headers: dict | None = None, open_timeout: float = 10.0):
        self.url = url
        self.headers = headers or {}
        self.open_timeout = open_timeout
        self.ws = None

    async def ensure(self) -> float | None:
        """Opens the connection when needed; returns the time it took in ms, or None if it was open."""
        if self.ws is not None and self.ws.state is State.OPEN:
            return None
        await self.close()
        t0 = time.perf_counter()
        self.ws = await ws_connect(self.url, additional_headers=self.headers or None,
                                   open_timeout=self.open_timeout, max_size=None,
                                   ping_interval=None, close_timeout=2, compression=None)
        return (time.perf_counter() - t0) * 1000.0

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                await ws.close()
            except Exception:
                pass


def finalize_timing(res: RequestResult, t_first_text: float, t_end_text: float | None,
                    t_finished: float, arrivals: list[float], sizes: list[int]) -> None:
    """Fills the derived timing fields of an ok request from its raw timeline (perf_counter seconds)."""
    sr = res.sample_rate or 0
    res.bytes = sum(sizes)
    res.chunks = len(sizes)
    res.audio_s = res.bytes / BYTES_PER_SAMPLE / sr if sr else 0.0
    res.total_ms = (t_finished - t_first_text) * 1000.0
    if arrivals:
        res.first_chunk_ms = (arrivals[0] - t_first_text) * 1000.0
        if t_end_text is not None:
            res.first_chunk_after_end_ms = (arrivals[0] - t_end_text) * 1000.0
        durations = [n / BYTES_PER_SAMPLE / sr if sr else 0.0 for n in sizes]
        st = stats.playback_stalls(arrivals, durations)
        res.gaps_ms = [round(g * 1000.0, 3) for g in st["gaps"]]
        res.max_gap_ms = max(res.gaps_ms, default=0.0)
        res.stall_count = st["stall_count"]
        res.stall_total_ms = st["stall_total"] * 1000.0
        res.stall_max_ms = st["stall_max"] * 1000.0
    if res.audio_s > 0:
        res.rtf = (t_finished - t_first_text) / res.audio_s


async def run_request(conn: Connection, text: str, opts: RequestOptions, res: RequestResult,
                      clock0: float, fragments: list[str] | None = None) -> RequestResult:
    """Sends one request on ``conn`` and fills ``res``. Never raises for network or protocol failures:
    they become the outcome. The connection is closed (and reopened by the next request) whenever the
    request did not end cleanly."""
    deadline = time.perf_counter() + opts.request_timeout
    res.t_start = time.perf_counter() - clock0
    try:
        res.connect_ms = await asyncio.wait_for(conn.ensure(), timeout=opts.request_timeout)
    except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError, ConnectionClosed) as e:
        res.outcome, res.error_code = "error", "connect"
        res.error_message = f"{type(e).__name__}: {e}"
        res.t_end = time.perf_counter() - clock0
        await conn.close()
        return res
    ws = conn.ws
    start: dict = {"type": "start", "voice": opts.voice, "request_id": res.request_id, "format": "pcm"}
    if opts.tts_mode:
        start["mode"] = opts.tts_mode
    if opts.speed is not None:
        start["speed"] = opts.speed
    if opts.sample_rate is not None:
        start["sample_rate"] = opts.sample_rate
    if opts.seed is not None:
        start["seed"] = opts.seed
    start.update(opts.extra)
    if opts.mode == "text":
        start["text"] = text
        start["end"] = True

    arrivals: list[float] = []
    sizes: list[int] = []
    state = {"t_first_text": None, "t_end_text": None, "wav_header": False}
    clean = False
    sender: asyncio.Task | None = None

    async def send_fragments() -> None:
        interval = 1.0 / opts.token_rate if opts.token_rate > 0 else 0.0
        t_next = time.perf_counter()
        for frag in fragments or [text]:
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if state["t_first_text"] is None:  # timestamps are taken before the send
                state["t_first_text"] = time.perf_counter()
            await ws.send(json.dumps({"type": "text", "text": frag}, ensure_ascii=False))
            t_next += interval
        t_end = time.perf_counter()
        await ws.send(json.dumps({"type": "end"}))
        state["t_end_text"] = t_end

    async def receive() -> None:
        nonlocal sender, clean
        t_sent = time.perf_counter()
        await ws.send(json.dumps(start, ensure_ascii=False))
        if opts.mode == "text":
            state["t_first_text"] = state["t_end_text"] = t_sent
        while True:
            msg = await ws.recv()
            now = time.perf_counter()
            if isinstance(msg, (bytes, bytearray, memoryview)):
                n = len(msg)
                if state["wav_header"] and not sizes:  # `format: wav`: the first frame starts with it
                    n -= WAV_HEADER_BYTES
                if n > 0:
                    arrivals.append(now)
                    sizes.append(n)
                continue
            ev = json.loads(msg)
            kind = ev.get("type")
            rid = ev.get("request_id")
            if rid is not None and rid != res.request_id and kind in ("started", "finished", "cancelled"):
                continue  # not this request's (cannot happen with a correct worker; never miscount it)
            if kind == "started":
                res.sample_rate = int(ev.get("sample_rate") or 0) or None
                state["wav_header"] = ev.get("format") == "wav"
                res.worker = ev.get("worker") or res.worker
                if opts.mode == "stream" and sender is None:
                    sender = asyncio.create_task(send_fragments())
            elif kind == "finished":
                st = ev.get("stats") or {}
                res.worker_stats = st
                res.worker = st.get("worker") or ev.get("worker") or res.worker
                if sender is not None:
                    await sender  # it has sent `end` already, or the worker could not finish
                if state["t_first_text"] is None:
                    raise _Failure("error", "protocol", "finished before any text was sent")
                res.outcome = "ok"
                finalize_timing(res, state["t_first_text"], state["t_end_text"], now, arrivals, sizes)
                clean = True
                return
            elif kind == "error":
                code = ev.get("code") or "unknown"
                outcome = "busy" if code == "busy" else "error"
                # An error before `started` refused the request; after it, one with request_ended ends it.
                # Either way the connection stays usable, except after an internal error or an error that
                # leaves the request running (`request_ended: false`): then it is closed, which cancels it.
                clean = code != "internal" and not (res.sample_rate is not None
                                                   and ev.get("request_ended") is False)
                raise _Failure(outcome, code, ev.get("message"))
            elif kind == "cancelled":
                raise _Failure("dropped", "cancelled", "the worker cancelled the request")
            # unknown events are ignored (forward compatible)

    try:
        remaining = deadline - time.perf_counter()
        await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
    except _Failure as f:
        res.outcome, res.error_code, res.error_message = f.outcome, f.code, f.message
    except asyncio.TimeoutError:
        res.outcome, res.error_code = "dropped", "timeout"
        res.error_message = f"no `finished` within {opts.request_timeout:g} s"
        clean = False
    except ConnectionClosed as e:
        res.outcome, res.error_code = "dropped", "connection_closed"
        res.error_message = f"{type(e).__name__}: {e}"
        clean = False
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        res.outcome, res.error_code = "error", "protocol"
        res.error_message = f"bad message from the worker: {e}"
        clean = False
    except OSError as e:
        res.outcome, res.error_code = "dropped", "connection_closed"
        res.error_message = f"{type(e).__name__}: {e}"
        clean = False
    finally:
        if sender is not None and not sender.done():
            sender.cancel()
        if sender is not None:
            try:
                await sender
            except BaseException:
                pass
    res.t_end = time.perf_counter() - clock0
    if res.outcome != "ok":
        # partial audio of a failed request still counts in bytes, not in audio seconds
        res.bytes = sum(sizes)
        res.chunks = len(sizes)
    if sender is not None and res.outcome != "ok":
        clean = False  # fragments still in flight would reach the worker after the request ended
    if not clean:
        await conn.close()
    return res


async def list_voices(url: str, headers: dict | None = None, timeout: float = 10.0) -> list[str]:
    """The worker's voices (the `voices` message). Raises RuntimeError when the worker does not say."""
    conn = Connection(url, headers, open_timeout=timeout)
    try:
        await asyncio.wait_for(conn.ensure(), timeout)
        await conn.ws.send(json.dumps({"type": "voices"}))
        while True:
            msg = await asyncio.wait_for(conn.ws.recv(), timeout)
            if isinstance(msg, str):
                break
        ev = json.loads(msg)
        if ev.get("type") != "voices" or not isinstance(ev.get("voices"), list):
            raise RuntimeError(f"the worker did not list its voices: {msg[:200]}")
        return [str(v) for v in ev["voices"]]
    finally:
        await conn.close()


class _Failure(Exception):
    def __init__(self, outcome: str, code: str, message: str | None):
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message
