"""The worker: one websockets server (WebSocket `/ws` + plain HTTP routes), readiness and drain."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve

from .admission import Admission
from .config import ServerConfig
from .dashscope import PATHS as DASHSCOPE_PATHS, DashScopeSession
from .http import HttpRoutes
from .metrics import WorkerMetrics
from .openai_speech import HttpApiServer
from .session import Session

log = logging.getLogger("cosyvoice_tts.server")

WS_PATHS = ("/ws", "/ws/")
CLOSE_GOING_AWAY = 1001


class WorkerServer:
    """Serves one engine. ``engine`` may be attached later (``attach_engine``): until then /readyz is 503 and
    ``start`` is answered ``not_ready``.

    ``params_cls`` builds the engine's request parameters (default: ``cosyvoice_tts.engine.SynthesisParams``).
    """

    def __init__(self, cfg: ServerConfig, *, params_cls: Callable[..., Any] | None = None,
                 gpu_memory_fn: Callable[[], float | None] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.engine: Any = None
        self._params_cls = params_cls
        self._gpu_memory_fn = gpu_memory_fn or (lambda: 0.0)
        self.metrics = WorkerMetrics()
        self.metrics.max_sessions.set(cfg.max_sessions)
        self.admission = Admission(cfg.max_sessions)
        self.ready = False
        self.draining = False
        self.sessions: set[Session] = set()
        self.worker_id = cfg.worker_id or "?"
        self.http = HttpRoutes(self)
        self.http_api: HttpApiServer | None = None  # POST /v1/audio/speech on cfg.http_port (openai_speech.py)
        self._server: Server | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._cut_now = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and start serving (health endpoints answer from now on)."""
        hard_max = max(4 * self.cfg.max_frame_bytes, 1 << 20)
        self._server = await serve(
            self._handle,
            self.cfg.host,
            self.cfg.port,
            process_request=self.http.process_request,
            max_size=hard_max,  # larger frames close the connection (1009); up to it: `frame_too_large`
            max_queue=32,
            ping_interval=20,
            ping_timeout=20,
            compression=None,  # audio does not compress; saves CPU
        )
        if self.cfg.http_port is not None:
            self.http_api = HttpApiServer(self)
            try:
                await self.http_api.start(self.cfg.host, self.cfg.http_port)
            except OSError:
                self.http_api = None
                self._server.close()
                await self._server.wait_closed()
                raise
        self.worker_id = self.cfg.default_worker_id(self.port)
        log.info("listening on %s:%d (worker %s)", self.cfg.host, self.port, self.worker_id)
        if self.http_api is not None:
            log.info("http api: POST /v1/audio/speech at http://%s:%d", self.cfg.host, self.http_api.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def attach_engine(self, engine: Any) -> None:
        self.engine = engine
        self.metrics.attach_engine(self._engine_stats, self._gpu_memory_fn)

    def set_ready(self) -> None:
        self.ready = True
        self._update_ready_metric()

    def _engine_stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def _update_ready_metric(self) -> None:
        self.metrics.ready.set(1 if (self.ready and not self.draining) else 0)
        self.metrics.draining.set(1 if self.draining else 0)

    def submit(self, params: Any, text: str | None) -> Any:
        """Build the engine's parameters and submit (runs in a thread: the frontend may be slow)."""
        cls = self._params_cls
        if cls is None:
            from ..engine import SynthesisParams as cls  # noqa: N813
        sp = cls(
            voice=params.voice, mode=params.mode, instruct_text=params.instruct_text, speed=params.speed,
            seed=params.seed, stream=True,
        )  # fmt: skip
        return self.engine.submit(sp, text=text)

    def on_request_started(self) -> None:
        self._idle.clear()

    def on_request_closed(self) -> None:
        if self.admission.active == 0:
            self._idle.set()

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request is not None else ""
        session = DashScopeSession(self, ws) if path in DASHSCOPE_PATHS else Session(self, ws)
        self.sessions.add(session)
        self.metrics.connections_active.set(len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.connections_active.set(len(self.sessions))

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, let in-flight ones finish (at most ``timeout`` s), then close every connection.
        Returns True when all requests finished in time."""
        if not self.draining:
            self.draining = True
            self._update_ready_metric()
            log.info("draining: %d request(s) in flight, up to %.0f s", self.admission.active, timeout)
        idle = asyncio.create_task(self._idle.wait())
        cut_now = asyncio.create_task(self._cut_now.wait())
        try:
            await asyncio.wait({idle, cut_now}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            cut_now.cancel()
        in_time = self._idle.is_set()
        if not in_time:
            cut = [s for s in list(self.sessions) if s.active is not None]
            log.warning("drain: ending %d unfinished request(s)", len(cut))
            await asyncio.gather(*(s.drain_cut() for s in cut), return_exceptions=True)
        await self.close()
        return in_time

    def cut_now(self) -> None:
        """End the drain wait at once (a second SIGTERM)."""
        self._cut_now.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self.http_api is not None:
            await self.http_api.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
