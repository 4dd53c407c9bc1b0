"""The vLLM export of the speech-token LM: round trip, config, stamp, stale/partial rebuilds (no vLLM needed)."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

from cosyvoice_tts.vllm_backend import export as ex


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    """A private copy (exports write next to the model)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns(ex.EXPORT_DIR_NAME))
    return out


def test_export_round_trips_head_embeddings_and_body(model_copy):
    info = ex.ensure_export(model_copy)
    assert info.rebuilt and info.path == model_copy.resolve() / ex.EXPORT_DIR_NAME
    original = torch.load(model_copy / "llm.pt", map_location="cpu", weights_only=True)
    exported = load_file(str(info.path / ex.WEIGHTS_NAME))

    assert torch.equal(exported["model.embed_tokens.weight"], original["speech_embedding.weight"])
    assert torch.equal(exported["lm_head.weight"], original["llm_decoder.weight"])
    assert torch.equal(exported["lm_head.bias"], original["llm_decoder.bias"])
    assert exported["lm_head.bias"].abs().sum() > 0  # the tiny model's head bias is not trivial
    body = {k[len("llm.model.model."):]: v for k, v in original.items()
            if k.startswith("llm.model.model.") and not k.startswith("llm.model.model.embed_tokens.")}
    assert set(exported) == {"model." + k for k in body} | {"model.embed_tokens.weight", "lm_head.weight",
                                                           "lm_head.bias"}
    for key, value in body.items():
        assert torch.equal(exported["model." + key], value), key
    # the text embedding, sos/task embeddings and the tied text head are not part of the export
    assert not any("llm_embedding" in k for k in exported)


def test_export_config_and_stamp(model_copy):
    info = ex.ensure_export(model_copy)
    speech_vocab = torch.load(model_copy / "llm.pt", weights_only=True)["speech_embedding.weight"].shape[0]
    qwen = json.loads((model_copy / "CosyVoice-BlankEN" / "config.json").read_text())
    config = json.loads((info.path / "config.json").read_text())
    assert config["architectures"] == [ex.ARCHITECTURE]
    assert config["model_type"] == "qwen2"
    assert config["vocab_size"] == speech_vocab == info.speech_token_size + 3
    assert config["tie_word_embeddings"] is False and config["lm_head_bias"] is True
    assert config["eos_token_id"] == info.speech_token_size
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "rope_theta"):
        assert config[key] == qwen[key], key
    stamp = json.loads((info.path / ex.STAMP_NAME).read_text())
    assert stamp["format_version"] == ex.EXPORT_FORMAT_VERSION
    assert stamp["llm_pt_size"] == (model_copy / "llm.pt").stat().st_size
    assert set(stamp["files"]) == {"config.json", "generation_config.json", ex.WEIGHTS_NAME}


def test_current_export_is_reused(model_copy):
    first = ex.ensure_export(model_copy)
    weights = first.path / ex.WEIGHTS_NAME
    before = weights.stat().st_mtime_ns
    again = ex.ensure_export(model_copy)
    assert not again.rebuilt and weights.stat().st_mtime_ns == before


def test_changed_llm_pt_rebuilds(model_copy):
    first = ex.ensure_export(model_copy)
    state = torch.load(model_copy / "llm.pt", weights_only=True)
    state["llm_decoder.bias"] = state["llm_decoder.bias"] + 1.0
    torch.save(state, model_copy / "llm.pt")
    st = (model_copy / "llm.pt").stat()
    os.utime(model_copy / "llm.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock did
    assert not ex.is_current(first.path, model_copy)
    second = ex.ensure_export(model_copy)
    assert second.rebuilt
    exported = load_file(str(second.path / ex.WEIGHTS_NAME))
    assert torch.equal(exported["lm_head.bias"], state["llm_decoder.bias"])


@pytest.mark.parametrize("damage", ["no_stamp", "truncated_weights", "other_format", "no_weights"])
def test_partial_or_stale_export_is_rebuilt_not_used(model_copy, damage, monkeypatch):
    info = ex.ensure_export(model_copy)
    weights = info.path / ex.WEIGHTS_NAME
    if damage == "no_stamp":
        (info.path / ex.STAMP_NAME).unlink()
    elif damage == "truncated_weights":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "no_weights":
        weights.unlink()
    else:
        monkeypatch.setattr(ex, "EXPORT_FORMAT_VERSION", ex.EXPORT_FORMAT_VERSION + 1)
    assert not ex.is_current(info.path, model_copy)
    rebuilt = ex.ensure_export(model_copy)
    assert rebuilt.rebuilt and ex.is_current(rebuilt.path, model_copy)
    original = torch.load(model_copy / "llm.pt", weights_only=True)
    assert torch.equal(load_file(str(rebuilt.path / ex.WEIGHTS_NAME))["lm_head.weight"], original["llm_decoder.weight"])
    leftovers = [p.name for p in rebuilt.path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_failed_export_leaves_nothing_behind(model_copy, monkeypatch):
    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ex.ensure_export(model_copy)
    names = [p.name for p in model_copy.iterdir()]
    assert ex.EXPORT_DIR_NAME not in names and not any(".tmp-" in n for n in names)


def test_read_only_model_dir_exports_into_cache(model_copy, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root writes anywhere: simulate a read-only model directory instead
        monkeypatch.setattr(ex.os, "access", lambda path, mode: False)
    else:
        model_copy.chmod(0o555)
    cache = tmp_path / "cache"
    monkeypatch.setenv(ex.CACHE_ENV, str(cache))
    try:
        info = ex.ensure_export(model_copy)
    finally:
        model_copy.chmod(0o755)
    assert info.path.parent == cache / "vllm_exports" and info.path.name.startswith("model-")
    assert ex.is_current(info.path, model_copy)


def test_concurrent_exports_build_once(model_copy):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ex.ensure_export(model_copy))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3 and sum(r.rebuilt for r in results) == 1


def test_not_a_cosyvoice_checkpoint_is_refused(model_copy):
    state = torch.load(model_copy / "llm.pt", weights_only=True)
    del state["llm_decoder.bias"]
    torch.save(state, model_copy / "llm.pt")
    with pytest.raises(ex.ExportError, match="llm_decoder.bias"):
        ex.ensure_export(model_copy)
    (model_copy / "CosyVoice-BlankEN" / "config.json").unlink()
    with pytest.raises(ex.ExportError, match="config.json"):
        ex.ensure_export(model_copy)
