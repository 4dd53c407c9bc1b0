"""Load shapes: N closed-loop sessions for R rounds or a duration, or open-loop arrivals at a rate."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass

from .client import Connection, RequestOptions, RequestResult, run_request
from .corpus import TextPicker, llm_fragments
from .progress import Progress


@dataclass
class LoadConfig:
    parallel: int = 1              # concurrent sessions (closed loop) or connection limit (open loop)
    rounds: int = 1                # requests per session (ignored when duration is set)
    duration: float | None = None  # seconds during which new requests start
    rate: float | None = None      # open loop: mean arrivals per second (Poisson)
    reconnect: bool = False        # a new connection for every request
    backoff: float = 0.2           # seconds a session waits after a failed request before the next
    seed: int = 0

    def validate(self) -> None:
        if self.parallel < 1:
            raise ValueError("--parallel must be at least 1")
        if self.duration is None and self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")

    def expected_requests(self) -> int | None:
        """How many requests the run makes, when that is known in advance."""
        if self.duration is not None:
            return None
        return self.parallel * self.rounds


class LoadRunner:
    def __init__(self, url: str, headers: dict, picker: TextPicker, opts: RequestOptions,
                 cfg: LoadConfig, progress: Progress | None = None, level: int | None = None,
                 stop: asyncio.Event | None = None):
        cfg.validate()
        self.url, self.headers, self.picker, self.opts, self.cfg = url, headers, picker, opts, cfg
        self.progress = progress
        self.level = level
        self.stop = stop or asyncio.Event()
        self.records: list[RequestResult] = []
        self._run_id = uuid.uuid4().hex[:8]
        self._clock0 = 0.0
        self._t_begin = 0.0

    def _new_result(self, session: int) -> tuple[RequestResult, str]:
        text = self.picker.next()
        idx = len(self.records)
        res = RequestResult(request_id=f"bench-{self._run_id}-{idx}", session=session, index=idx,
                            level=self.level, text_chars=len(text), mode=self.opts.mode)
        self.records.append(res)
        return res, text

    async def _one(self, conn: Connection, session: int, res: RequestResult, text: str) -> None:
        frags = llm_fragments(text) if self.opts.mode == "stream" else None
        await run_request(conn, text, self.opts, res, self._clock0, frags)
        if self.cfg.reconnect:
            await conn.close()
        if self.progress:
            self.progress.add(res)

    def _time_left(self) -> bool:
        if self.stop.is_set():
            return False
        if self.cfg.duration is None:
            return True
        return time.perf_counter() - self._t_begin < self.cfg.duration

    async def _session(self, session: int) -> None:
        conn = Connection(self.url, self.headers, open_timeout=min(10.0, self.opts.request_timeout))
        try:
            n = 0
            while self._time_left() and (self.cfg.duration is not None or n < self.cfg.rounds):
                res, text = self._new_result(session)
                await self._one(conn, session, res, text)
                n += 1
                if res.outcome != "ok" and self.cfg.backoff > 0 and self._time_left():
                    await asyncio.sleep(self.cfg.backoff)
        finally:
            await conn.close()

    async def _open_loop(self) -> None:
        rng = random.Random(self.cfg.seed)
        free: asyncio.Queue[Connection] = asyncio.Queue()
        conns = [Connection(self.url, self.headers, open_timeout=min(10.0, self.opts.request_timeout))
                 for _ in range(self.cfg.parallel)]
        for c in conns:
            free.put_nowait(c)
        tasks: set[asyncio.Task] = set()
        limit = self.cfg.expected_requests()
        t_next = time.perf_counter()
        sent = 0

        async def fire(conn: Connection, session: int, res: RequestResult, text: str) -> None:
            try:
                await self._one(conn, session, res, text)
            finally:
                free.put_nowait(conn)

        try:
            while self._time_left() and (limit is None or sent < limit):
                delay = t_next - time.perf_counter()
                if delay > 0:
                    try:  # wake early on stop
                        await asyncio.wait_for(self.stop.wait(), timeout=delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                    if not self._time_left():
                        break
                t_next += rng.expovariate(self.cfg.rate)
                sent += 1
                try:
                    conn = free.get_nowait()
                except asyncio.QueueEmpty:
                    # every allowed connection is busy: the deployment (or --parallel) cannot keep up
                    res, _ = self._new_result(session=-1)
                    now = time.perf_counter() - self._clock0
                    res.t_start = res.t_end = now
                    res.outcome, res.error_code = "dropped", "client_saturated"
                    res.error_message = f"all {self.cfg.parallel} connections busy at the arrival"
                    if self.progress:
                        self.progress.add(res)
                    continue
                res, text = self._new_result(session=conns.index(conn))
                t = asyncio.create_task(fire(conn, conns.index(conn), res, text))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for c in conns:
                await c.close()

    async def run(self, clock0: float | None = None) -> list[dict]:
        """Runs the load; returns the request records. ``clock0``: perf_counter origin of the run."""
        self._t_begin = time.perf_counter()
        self._clock0 = self._t_begin if clock0 is None else clock0
        if self.cfg.rate is not None:
            await self._open_loop()
        else:
            await asyncio.gather(*(self._session(s) for s in range(self.cfg.parallel)))
        return [r.to_dict() for r in self.records]
