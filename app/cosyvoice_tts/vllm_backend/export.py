"""Export the speech-token LM of a CosyVoice2 model directory as a checkpoint directory vLLM can load.

CosyVoice2's `Qwen2LM` runs a Qwen2 body on input embeddings it builds itself (sos/task embeddings, the text
embedding of the Qwen2 tokenizer, the speech-token embedding) and reads its output through `llm_decoder`, a
`Linear(hidden, speech_token_size + 3)` *with* a bias. vLLM generates by embedding each sampled token with the
model's input embedding and scoring with its head, so the exported model is the Qwen2 body with

- `model.embed_tokens` = `speech_embedding` (vocabulary = speech_token_size + 3: every token vLLM samples is a
  speech token, eos, an unused id or the bistream fill token, and the next input is its speech embedding);
- `lm_head` = `llm_decoder`, weight *and bias*;
- the prompt (sos + text + task + prompt speech) is passed as prompt embeddings, built by our engine.

Qwen2's head has no bias and no exact rewrite of the body can fold one in (the last RMSNorm leaves no constant
channel to carry it), so the export declares its own architecture, `CosyVoice2LMForCausalLM`, registered with
vLLM by `cosyvoice_tts.vllm_backend.model` (Qwen2ForCausalLM with `lm_head.bias`). A plain vLLM without that
registration refuses the directory instead of silently dropping the bias.

The export is cached next to the model (`<model_dir>/vllm_export/`, or under a cache directory when the model
directory is read-only) and carries a stamp (`cosyvoice_export.json`) with our format version and a hash of
`llm.pt`'s size and mtime and of the Qwen2 config. A directory whose stamp is missing, unreadable or different
is rebuilt, never used: it is written into a temporary sibling and renamed into place, under a file lock so that
several workers sharing the model directory export it once. This module needs torch and safetensors only.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
ARCHITECTURE = "CosyVoice2LMForCausalLM"
STAMP_NAME = "cosyvoice_export.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_DIR_NAME = "vllm_export"
CACHE_ENV = "COSYVOICE_TTS_CACHE"  # same variable the worker uses for its cache

_BODY_PREFIX = "llm.model.model."
_QWEN2_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
               "max_window_layers", "sliding_window", "use_sliding_window", "attention_dropout", "rope_scaling",
               "rope_parameters", "layer_types",
               "head_dim")


class ExportError(RuntimeError):
    """The model directory cannot be exported (missing files, unexpected checkpoint)."""


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    speech_token_size: int
    vocab_size: int
    hidden_size: int
    rebuilt: bool


def source_fingerprint(model_dir: Path) -> dict:
    """What the stamp must match: our format version, llm.pt's size and mtime, the Qwen2 config's bytes."""
    llm_pt = model_dir / "llm.pt"
    config = model_dir / "CosyVoice-BlankEN" / "config.json"
    try:
        st = llm_pt.stat()
        config_bytes = config.read_bytes()
    except FileNotFoundError as exc:
        raise ExportError(f"{model_dir}: cannot export the LM for vLLM, {exc.filename} is missing") from exc
    h = hashlib.sha256()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(b"\0")
    h.update(config_bytes)
    return {"format_version": EXPORT_FORMAT_VERSION, "architecture": ARCHITECTURE,
            "llm_pt_size": st.st_size, "llm_pt_mtime_ns": st.st_mtime_ns, "source_sha256": h.hexdigest()}


def _read_stamp(export_dir: Path) -> dict | None:
    try:
        return json.loads((export_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(export_dir: Path, model_dir: Path) -> bool:
    """True when export_dir is a complete export of model_dir's current llm.pt in our current format."""
    stamp = _read_stamp(export_dir)
    if stamp is None:
        return False
    expected = source_fingerprint(model_dir)
    if any(stamp.get(k) != v for k, v in expected.items()):
        return False
    # The stamp is written last; still check the files it vouches for are whole.
    for name, size in stamp.get("files", {}).items():
        path = export_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(stamp.get("files"))


def default_export_dir(model_dir: Path, cache_root: str | Path | None = None) -> Path:
    """`<model_dir>/vllm_export` when the model directory is writable, else a per-model cache directory."""
    model_dir = Path(model_dir).resolve()
    if cache_root is None and os.access(model_dir, os.W_OK):
        return model_dir / EXPORT_DIR_NAME
    if cache_root is None:
        cache_root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cosyvoice_tts"
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]
    return Path(cache_root) / "vllm_exports" / f"{model_dir.name}-{key}"


def _qwen2_config(model_dir: Path) -> dict:
    path = model_dir / "CosyVoice-BlankEN" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportError(f"{path}: the Qwen2 config of CosyVoice-BlankEN is missing") from exc


def export_state_dict(llm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm.pt tensors -> the exported tensors, under vLLM's Qwen2ForCausalLM names (plus lm_head.bias)."""
    required = ("speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias", _BODY_PREFIX + "norm.weight")
    missing = [k for k in required if k not in llm_state]
    if missing:
        raise ExportError(f"llm.pt lacks {missing}: not a CosyVoice2 Qwen2LM checkpoint")
    speech = llm_state["speech_embedding.weight"]
    head_w, head_b = llm_state["llm_decoder.weight"], llm_state["llm_decoder.bias"]
    if head_w.shape[0] != speech.shape[0] or head_b.shape[0] != speech.shape[0]:
        raise ExportError(f"llm_decoder {tuple(head_w.shape)} / bias {tuple(head_b.shape)} and speech_embedding "
                          f"{tuple(speech.shape)} disagree on the speech-token vocabulary")
    out: dict[str, torch.Tensor] = {}
    for key, value in llm_state.items():
        if key.startswith(_BODY_PREFIX) and not key.startswith(_BODY_PREFIX + "embed_tokens."):
            out["model." + key[len(_BODY_PREFIX):]] = value
    if not any(k.startswith("model.layers.") for k in out):
        raise ExportError("llm.pt has no Qwen2 decoder layers under 'llm.model.model.layers.'")
    out["model.embed_tokens.weight"] = speech
    out["lm_head.weight"] = head_w
    out["lm_head.bias"] = head_b
    # safetensors wants contiguous, unshared storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def export_config(qwen_config: dict, vocab_size: int, torch_dtype: torch.dtype) -> dict:
    config = {k: qwen_config[k] for k in _QWEN2_KEYS if k in qwen_config}
    config.update({
        "architectures": [ARCHITECTURE],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "lm_head_bias": True,
        "torch_dtype": str(torch_dtype).replace("torch.", ""),
        "use_cache": True,
        # No text tokenizer: tokens are speech tokens. eos is the speech eos; the engine passes stop ids itself.
        "bos_token_id": None,
        "eos_token_id": vocab_size - 3,
    })
    return config


def _write_export(model_dir: Path, target: Path) -> ExportInfo:
    from safetensors.torch import save_file

    fingerprint = source_fingerprint(model_dir)
    qwen = _qwen2_config(model_dir)
    state = torch.load(model_dir / "llm.pt", map_location="cpu", weights_only=True)
    tensors = export_state_dict(state)
    del state
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    if hidden != qwen.get("hidden_size"):
        raise ExportError(f"speech_embedding width {hidden} != Qwen2 hidden_size {qwen.get('hidden_size')}")
    dtype = tensors["lm_head.weight"].dtype
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(work / WEIGHTS_NAME), metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(export_config(qwen, vocab, dtype), indent=2) + "\n")
        (work / "generation_config.json").write_text(json.dumps({"eos_token_id": vocab - 3}) + "\n")
        files = {p.name: p.stat().st_size for p in work.iterdir()}
        stamp = {**fingerprint, "speech_token_size": vocab - 3, "vocab_size": vocab, "hidden_size": hidden,
                 "files": files, "source": str(model_dir)}
        # The stamp goes last: a directory without it is partial by definition.
        stamp_tmp = work / (STAMP_NAME + ".tmp")
        stamp_tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        with open(stamp_tmp, "rb") as f:
            os.fsync(f.fileno())
        stamp_tmp.rename(work / STAMP_NAME)
        for path in [work, *work.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        work.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportInfo(target, vocab - 3, vocab, hidden, rebuilt=True)


def ensure_export(model_dir: str | Path, export_dir: str | Path | None = None) -> ExportInfo:
    """Return a current export of model_dir's LM, building (or rebuilding) it first if needed."""
    model_dir = Path(model_dir).resolve()
    target = Path(export_dir) if export_dir is not None else default_export_dir(model_dir)
    if is_current(target, model_dir):
        return _info(target, rebuilt=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_current(target, model_dir):  # another worker built it while we waited
                return _info(target, rebuilt=False)
            reason = "missing" if not target.exists() else "stale or partial"
            log.info("exporting the LM of %s for vLLM into %s (%s)", model_dir, target, reason)
            return _write_export(model_dir, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _info(target: Path, rebuilt: bool) -> ExportInfo:
    stamp = _read_stamp(target) or {}
    return ExportInfo(target, int(stamp["speech_token_size"]), int(stamp["vocab_size"]), int(stamp["hidden_size"]),
                      rebuilt)
