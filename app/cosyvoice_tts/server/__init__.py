"""The per-GPU WebSocket worker (``python -m cosyvoice_tts.server``); see docs/protocol.md.

Modules: ``config`` (CLI/env), ``model`` (device, default model, engine loading), ``app`` (the server, readiness,
drain), ``http`` (/healthz /readyz /metrics, handshake checks), ``session`` (the /ws protocol state machine),
``protocol`` (message validation, error codes), ``admission``, ``auth``, ``audio`` (PCM/WAV framing,
resampling), ``metrics`` (Prometheus).
"""

from .app import WorkerServer
from .config import ServerConfig, parse_args

__all__ = ["WorkerServer", "ServerConfig", "parse_args"]
