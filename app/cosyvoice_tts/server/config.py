"""Worker configuration: command line and environment."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field

AUTH_TOKEN_ENV = "COSYVOICE_TTS_AUTH_TOKEN"
CACHE_ENV = "COSYVOICE_TTS_CACHE"


# The engine's vocoder placements (engine/vocoder_worker.py VOCODER_MODES; not imported: parsing needs no torch)
VOCODER_MODES = ("thread", "overlap")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    http_port: int | None = None  # HTTP API listener (POST /v1/audio/speech); None: none; 0: a free port
    gpu: int = 0
    backend: str = "native"
    model_dir: str | None = None
    dtype: str = "fp32"
    max_sessions: int = 16
    max_context: int = 4096  # LM context per session (prompt + text + speech tokens): sizes the KV cache
    gpu_memory_fraction: float = 0.9  # share of the card this worker may allocate (native backend)
    eager_kernels: bool = False  # no compiled elementwise kernels on the GPU (faster start, slower steps)
    flow_memory_gib: float | None = None  # incremental flow pool (native); None: what the fraction leaves; 0: off
    flow_graph_past_pages: int | None = None  # incremental flow graphs captured up to this past (native); None: all
    lm_sms: int = 0  # SMs kept for the LM alone, the vocoder on the rest (native); 0: both share the whole GPU
    vocoder: str | None = None  # where the vocoder's host work runs (native): thread | overlap; None: the engine's
    max_connections: int = 0  # 0: 4 x max_sessions
    drain_timeout: float = 30.0
    auth_token: str | None = field(default=None, repr=False)
    max_text_chars: int = 20000
    max_frame_bytes: int = 256 * 1024
    text_timeout: float = 60.0
    worker_id: str | None = None
    voices_dir: str | None = None
    warmup: bool = True
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.max_connections <= 0:
            self.max_connections = 4 * self.max_sessions

    def default_worker_id(self, bound_port: int) -> str:
        return self.worker_id or f"{socket.gethostname()}:{bound_port}"

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be in 0..65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError("--http-port must be in 0..65535 (default --port + 1000)")
        if self.backend not in ("native", "vllm"):
            raise ValueError("--backend must be native or vllm")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError("--dtype must be fp32, fp16 or bf16")
        for name in ("max_sessions", "max_text_chars", "max_frame_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.drain_timeout < 0 or self.text_timeout <= 0:
            raise ValueError("--drain-timeout must be >= 0 and --text-timeout > 0")
        if self.gpu < 0:
            raise ValueError("--gpu must be >= 0")
        if self.max_context < 256:
            raise ValueError("--max-context must be >= 256")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("--gpu-memory-fraction must be in (0, 1]")
        if self.flow_memory_gib is not None and self.flow_memory_gib < 0:
            raise ValueError("--flow-memory-gib must be >= 0")
        if self.lm_sms < 0:
            raise ValueError("--lm-sms must be >= 0")
        if self.flow_graph_past_pages is not None and self.flow_graph_past_pages < 0:
            raise ValueError("--flow-graph-past-pages must be >= 0")
        if self.vocoder is not None and self.vocoder not in VOCODER_MODES:
            raise ValueError(f"--vocoder must be one of {', '.join(VOCODER_MODES)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cosyvoice_tts.server",
        description="Per-GPU CosyVoice2 streaming TTS worker: WebSocket /ws and /api-ws/v1/inference (DashScope), "
        "GET /healthz /readyz /metrics; POST /v1/audio/speech on --http-port.",
    )
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (CPU when CUDA is unavailable)")
    p.add_argument("--port", type=int, default=8081, help="TCP port (default 8081; 0 picks a free one)")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="HTTP API port for POST /v1/audio/speech (default --port + 1000; a free one with --port 0; "
        "-1: no HTTP API listener)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--backend", choices=("native", "vllm"), default="native", help="LM backend (default native)")
    p.add_argument(
        "--model-dir",
        default=None,
        help="CosyVoice2 model directory (release layout). Default: the embedded tiny random model, built once "
        f"into ${CACHE_ENV} or ~/.cache/cosyvoice_tts",
    )
    p.add_argument("--fp16", action="store_true", help="run in float16 (same as --dtype fp16)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="compute dtype (default fp32)")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent requests; past it: 'busy' (default 16)")
    p.add_argument(
        "--max-context",
        type=int,
        default=4096,
        help="LM context tokens per session (prompt + text + speech; 25 speech tokens per second of audio); "
        "with --max-sessions it sizes the KV cache allocated at start (default 4096)",
    )
    p.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=0.9,
        help="share of the GPU's memory this worker may allocate (native backend; the worker refuses to start "
        "when --max-sessions x --max-context does not fit) (default 0.9)",
    )
    p.add_argument(
        "--eager-kernels",
        action="store_true",
        help="native backend on a GPU: skip compiling the fused elementwise kernels (torch.compile): about a "
        "minute less to start, slower decode and flow steps",
    )
    p.add_argument(
        "--flow-memory-gib",
        type=float,
        default=None,
        help="native backend: GPU memory for the flow's per-stream memory, which spares a stream from re-running "
        "its whole prefix at every chunk (115 MB per second of audio kept); 0: always re-run (default: what "
        "--gpu-memory-fraction leaves after the model, the KV cache and the CUDA graphs, less 8 GiB)",
    )
    p.add_argument(
        "--flow-graph-past-pages",
        type=int,
        default=None,
        help="native backend: capture the incremental flow's CUDA graphs at start only for streams with up to this "
        "many seconds of audio kept (50-frame pages of 1 s; 64 at most); longer ones run eagerly, slower. Each graph "
        "is about 0.6 s of start time (default: all, up to 64)",
    )
    p.add_argument(
        "--lm-sms",
        type=int,
        default=0,
        help="native backend on a GPU: keep this many SMs for the LM alone and run the vocoder on the rest (CUDA "
        "green contexts; needs the cuda-bindings package), so LM steps never wait behind vocoder kernels; 0: both "
        "share the whole GPU",
    )
    p.add_argument(
        "--vocoder",
        choices=VOCODER_MODES,
        default=None,
        help="native backend: where the vocoder's host work runs: its own Python thread, or launched from the LM "
        "loop between a step's launch and its result (overlap: no GIL shared by two threads) (default: overlap)",
    )
    p.add_argument(
        "--max-connections", type=int, default=0, help="open WebSocket connections (default 4 x --max-sessions)"
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests may take after SIGTERM"
    )
    p.add_argument(
        "--auth-token",
        default=None,
        help=f"require 'Authorization: Bearer <token>' on /ws (default: env {AUTH_TOKEN_ENV}; unset: no auth)",
    )
    p.add_argument("--max-text-chars", type=int, default=20000, help="characters of text per request")
    p.add_argument("--max-frame-bytes", type=int, default=256 * 1024, help="largest client frame accepted")
    p.add_argument(
        "--text-timeout", type=float, default=60.0, help="seconds a request may wait for its next text message"
    )
    p.add_argument("--worker-id", default=None, help="name reported to clients (default host:port)")
    p.add_argument(
        "--voices-dir",
        default=None,
        help="register zero-shot voices at start: <id>.wav with its transcript in <id>.txt",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up synthesis")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    env = os.environ if environ is None else environ
    a = build_parser().parse_args(argv)
    dtype = a.dtype or ("fp16" if a.fp16 else "fp32")
    if a.fp16 and a.dtype not in (None, "fp16"):
        raise SystemExit("error: --fp16 conflicts with --dtype " + a.dtype)
    token = a.auth_token if a.auth_token is not None else env.get(AUTH_TOKEN_ENV)
    if a.http_port is None:
        http_port: int | None = a.port + 1000 if a.port else 0
    else:
        http_port = None if a.http_port < 0 else a.http_port
    cfg = ServerConfig(
        host=a.host,
        port=a.port,
        http_port=http_port,
        gpu=a.gpu,
        backend=a.backend,
        model_dir=a.model_dir,
        dtype=dtype,
        max_sessions=a.max_sessions,
        max_context=a.max_context,
        gpu_memory_fraction=a.gpu_memory_fraction,
        eager_kernels=a.eager_kernels,
        flow_memory_gib=a.flow_memory_gib,
        flow_graph_past_pages=a.flow_graph_past_pages,
        lm_sms=a.lm_sms,
        vocoder=a.vocoder,
        max_connections=a.max_connections,
        drain_timeout=a.drain_timeout,
        auth_token=token or None,
        max_text_chars=a.max_text_chars,
        max_frame_bytes=a.max_frame_bytes,
        text_timeout=a.text_timeout,
        worker_id=a.worker_id,
        voices_dir=a.voices_dir,
        warmup=not a.no_warmup,
        log_level=a.log_level.upper(),
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    return cfg


def cache_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    d = env.get(CACHE_ENV)
    if d:
        return d
    return os.path.join(os.path.expanduser("~"), ".cache", "cosyvoice_tts")
