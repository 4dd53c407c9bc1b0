"""Prometheus metrics of one worker (its own registry, served at GET /metrics)."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("cosyvoice_tts.server")

PREFIX = "cosyvoice_tts"
FIRST_CHUNK_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class _EngineCollector:
    """Exports the numeric entries of ``engine.stats()`` and the GPU memory at scrape time."""

    def __init__(self, stats_fn: Callable[[], dict[str, Any]], gpu_memory_fn: Callable[[], float | None]):
        self._stats_fn = stats_fn
        self._gpu_memory_fn = gpu_memory_fn

    def describe(self):  # no fixed description: the engine decides its keys
        return []

    def collect(self):
        gpu = None
        try:
            gpu = self._gpu_memory_fn()
        except Exception:  # noqa: BLE001 - a scrape never fails because of the engine
            log.debug("gpu memory query failed", exc_info=True)
        g = GaugeMetricFamily(f"{PREFIX}_gpu_memory_bytes", "GPU memory allocated by this worker (0 on CPU)")
        g.add_metric([], float(gpu or 0.0))
        yield g
        try:
            stats = self._stats_fn() or {}
        except Exception:  # noqa: BLE001
            log.debug("engine.stats() failed", exc_info=True)
            stats = {}
        for key, value in sorted(stats.items()):
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)):
                continue
            name = f"{PREFIX}_engine_{_NAME_RE.sub('_', str(key))}"
            fam = GaugeMetricFamily(name, f"engine.stats()[{key!r}]")
            fam.add_metric([], float(value))
            yield fam
        info = stats.get("info")
        if isinstance(info, dict) and info:
            # Which LM backend and sampler serve here, so dashboards can tell a voice-exact card from another.
            keys = sorted(info)
            fam = GaugeMetricFamily(f"{PREFIX}_engine_info", "LM backend and sampling", labels=keys)
            fam.add_metric([str(info[k]) for k in keys], 1.0)
            yield fam


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge(f"{PREFIX}_sessions_active", "Requests being served now", registry=r)
        self.max_sessions = Gauge(f"{PREFIX}_max_sessions", "Admission limit (--max-sessions)", registry=r)
        self.connections_active = Gauge(f"{PREFIX}_connections_active", "Open WebSocket connections", registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests by outcome (finished, cancelled, disconnected, error, busy, ...)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.errors = Counter(f"{PREFIX}_errors", "Error events sent, by code", ["code"], registry=r)
        self.first_chunk = Histogram(
            f"{PREFIX}_first_chunk_seconds",
            "Time from the request's first text to its first audio frame",
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(f"{PREFIX}_audio_seconds", "Seconds of audio sent", registry=r)
        self.rtf = Histogram(f"{PREFIX}_rtf", "Real-time factor per finished request", buckets=RTF_BUCKETS, registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when loaded, warmed up and not draining", registry=r)
        self.draining = Gauge(f"{PREFIX}_draining", "1 while draining after SIGTERM", registry=r)
        for outcome in ("finished", "cancelled", "disconnected", "error", "busy", "draining"):
            self.requests.labels(outcome)

    def attach_engine(self, stats_fn: Callable[[], dict[str, Any]], gpu_memory_fn: Callable[[], float | None]) -> None:
        self.registry.register(_EngineCollector(stats_fn, gpu_memory_fn))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
