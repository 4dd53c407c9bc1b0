"""``python -m cosyvoice_tts.server``: the per-GPU worker process.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT drain), 1 when the model fails to load or the port
cannot be bound, 2 for configuration errors (bad flags, --backend vllm without vLLM, missing GPU index).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading

from .app import WorkerServer
from .config import ServerConfig, parse_args
from .model import StartupError, check_backend, gpu_memory_bytes, load_engine, register_voices, resolve_device, resolve_dtype

log = logging.getLogger("cosyvoice_tts.server")


def _in_thread(fn, *args) -> concurrent.futures.Future:
    """Run a blocking call in a daemon thread (a SIGTERM during model loading need not wait for it)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def body() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(exc)

    threading.Thread(target=body, daemon=True, name=getattr(fn, "__name__", "worker")).start()
    return fut


async def serve(cfg: ServerConfig) -> int:
    check_backend(cfg.backend)
    device = resolve_device(cfg.gpu)
    dtype = resolve_dtype(cfg.dtype, device)
    server = WorkerServer(cfg, gpu_memory_fn=lambda: gpu_memory_bytes(device))
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc)
        return 1

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s received: draining (up to %.0f s)", signal.Signals(signum).name, cfg.drain_timeout)
            stop.set()
        else:
            log.warning("%s received again: ending requests now", signal.Signals(signum).name)
            server.cut_now()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async def load() -> None:
        engine = await asyncio.wrap_future(_in_thread(load_engine, cfg, device, dtype))
        server.attach_engine(engine)
        if cfg.voices_dir:
            await asyncio.wrap_future(_in_thread(register_voices, engine, cfg.voices_dir))
        if cfg.warmup:
            t0 = loop.time()
            await asyncio.wrap_future(_in_thread(engine.warmup))
            log.info("warm-up done in %.2f s", loop.time() - t0)
        server.set_ready()
        voices = engine.voices()
        log.info(
            "ready: %d voice(s) (%s), sample rate %d, max %d session(s)",
            len(voices), ", ".join(voices[:8]) + (" ..." if len(voices) > 8 else ""), engine.sample_rate,
            cfg.max_sessions,
        )  # fmt: skip

    load_task = asyncio.create_task(load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if load_task.done() and load_task.exception() is not None:
        exc = load_task.exception()
        if isinstance(exc, StartupError):
            log.error("%s", exc)
            rc = 2
        else:
            log.error("model loading failed: %s", exc, exc_info=exc)
            rc = 1
        await server.close()
        _shutdown_engine(server)
        return rc
    if not load_task.done():
        load_task.cancel()
    await stop.wait()
    in_time = await server.drain(cfg.drain_timeout)
    _shutdown_engine(server)
    log.info("stopped (%s)", "all requests finished" if in_time else "drain timeout: requests cut")
    return 0


def _shutdown_engine(server: WorkerServer) -> None:
    if server.engine is None:
        return
    try:
        server.engine.shutdown()
    except Exception:  # noqa: BLE001
        log.warning("engine.shutdown() failed", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(cfg))
    except StartupError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
