"""Choosing the device, locating (or building) the model directory, loading the engine."""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any

from .config import ServerConfig, cache_dir

log = logging.getLogger("cosyvoice_tts.server")

DEFAULT_SIZE = "tiny"
DEFAULT_SEED = 0


class StartupError(Exception):
    """A configuration or environment problem that stops the worker before it serves (exit code 2)."""


def resolve_device(gpu: int) -> str:
    """``cuda:<gpu>`` when CUDA is available; CPU (logged clearly) when it is not."""
    import torch

    if not torch.cuda.is_available():
        log.warning("CUDA is not available: running on CPU (--gpu %d ignored)", gpu)
        return "cpu"
    count = torch.cuda.device_count()
    if gpu >= count:
        raise StartupError(f"--gpu {gpu}: only {count} CUDA device(s) visible (0..{count - 1})")
    name = torch.cuda.get_device_name(gpu)
    log.info("using cuda:%d (%s)", gpu, name)
    return f"cuda:{gpu}"


def resolve_dtype(dtype: str, device: str) -> str:
    if device == "cpu" and dtype != "fp32":
        log.warning("%s requested on CPU: using fp32", dtype)
        return "fp32"
    return dtype


def check_backend(backend: str) -> None:
    if backend != "vllm":
        return
    from ..vllm_backend import vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        raise StartupError(f"--backend vllm: {reason} (install vLLM, or use --backend native)")


def _make_model_fingerprint() -> str:
    """Changes whenever the code that writes the default model changes, so a stale cache is rebuilt."""
    tools = Path(__file__).resolve().parent.parent / "tools"
    h = hashlib.sha256()
    for path in sorted(tools.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def default_model_dir(environ: dict[str, str] | None = None) -> Path:
    """The embedded default model: built once (under a file lock, so parallel workers build it once)."""
    root = Path(cache_dir(environ))
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{DEFAULT_SIZE}-seed{DEFAULT_SEED}-{_make_model_fingerprint()}"
    marker = out / "cosyvoice2.yaml"
    if marker.exists():
        return out
    lock_path = root / (out.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not marker.exists():
                from ..tools.make_model import make_model

                log.info("building the embedded default model (%s, seed %d) into %s", DEFAULT_SIZE, DEFAULT_SEED, out)
                make_model(out, size=DEFAULT_SIZE, seed=DEFAULT_SEED)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def load_engine(cfg: ServerConfig, device: str, dtype: str) -> Any:
    """Load (blocking) and start the engine. Returns the engine."""
    from ..engine import Engine
    from ..engine.kv_cache import MemoryBudgetError

    if cfg.model_dir:
        model_dir = Path(cfg.model_dir)
        if not model_dir.is_dir():
            raise StartupError(f"--model-dir {model_dir}: not a directory")
    else:
        model_dir = default_model_dir()
    kwargs: dict[str, Any] = dict(device=device, dtype=dtype, max_sessions=cfg.max_sessions,
                                  max_context=cfg.max_context)
    params = inspect.signature(Engine.load).parameters
    if "gpu_memory_fraction" in params and cfg.backend == "native":
        kwargs["gpu_memory_fraction"] = cfg.gpu_memory_fraction
    if "compile_kernels" in params and cfg.backend == "native":
        kwargs["compile_kernels"] = not cfg.eager_kernels
    if "flow_memory_gib" in params and cfg.backend == "native" and cfg.flow_memory_gib is not None:
        kwargs["flow_memory_gib"] = cfg.flow_memory_gib
    if "paged_graph_past_pages" in params and cfg.backend == "native" and cfg.flow_graph_past_pages is not None:
        kwargs["paged_graph_past_pages"] = cfg.flow_graph_past_pages
    if "lm_sms" in params and cfg.backend == "native" and cfg.lm_sms:
        kwargs["lm_sms"] = cfg.lm_sms
    if "vocoder_mode" in params and cfg.backend == "native" and cfg.vocoder is not None:
        kwargs["vocoder_mode"] = cfg.vocoder
    if "backend" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["backend"] = cfg.backend
    elif cfg.backend != "native":
        raise StartupError(f"--backend {cfg.backend}: this engine build has no backend switch")
    log.info("loading %s on %s (%s, backend %s)", model_dir, device, dtype, cfg.backend)
    try:
        engine = Engine.load(str(model_dir), **kwargs)
        engine.start()
    except MemoryBudgetError as exc:  # a configuration error: restarting cannot help
        raise StartupError(str(exc)) from exc
    return engine


def register_voices(engine: Any, voices_dir: str) -> list[str]:
    """Register every ``<id>.wav`` (with its transcript ``<id>.txt``) in ``voices_dir`` as a zero-shot voice."""
    import soundfile as sf

    d = Path(voices_dir)
    if not d.is_dir():
        raise StartupError(f"--voices-dir {d}: not a directory")
    done = []
    for wav in sorted(d.glob("*.wav")):
        txt = wav.with_suffix(".txt")
        if not txt.exists():
            raise StartupError(f"voice {wav.name}: transcript {txt.name} is missing")
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
        engine.register_voice(wav.stem, audio.mean(axis=1), int(sr), txt.read_text(encoding="utf-8").strip())
        done.append(wav.stem)
    log.info("registered %d zero-shot voice(s) from %s", len(done), d)
    return done


def gpu_memory_bytes(device: str) -> float | None:
    if not device.startswith("cuda"):
        return 0.0
    import torch

    return float(torch.cuda.memory_allocated(torch.device(device)))


