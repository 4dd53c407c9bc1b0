"""Unit tests of the worker's pure parts: protocol validation, audio framing, auth, admission, configuration."""

from __future__ import annotations

import io
import logging
import wave

import numpy as np
import pytest

from cosyvoice_tts.server import protocol as P
from cosyvoice_tts.server.admission import Admission
from cosyvoice_tts.server.audio import PcmEncoder, float_to_pcm16, wav_header
from cosyvoice_tts.server.auth import bearer_token, check_bearer
from cosyvoice_tts.server.config import AUTH_TOKEN_ENV, CACHE_ENV, ServerConfig, cache_dir, parse_args
from cosyvoice_tts.server.model import StartupError, check_backend, resolve_device, resolve_dtype
from cosyvoice_tts.server.session import engine_error_code


# -- protocol ---------------------------------------------------------------------------------------------
def test_parse_start_defaults():
    p = P.parse_start({"type": "start", "voice": "v"})
    assert (p.voice, p.mode, p.speed, p.format, p.sample_rate, p.seed, p.request_id, p.text, p.end) == (
        "v", "sft", 1.0, "pcm", 24000, None, None, None, False)  # fmt: skip


def test_parse_start_full_and_dashscope_style_zero_rate():
    p = P.parse_start({"type": "start", "voice": "v", "mode": "instruct2", "instruct_text": "happy", "speed": 1.5,
                       "format": "wav", "sample_rate": 0, "seed": 7, "request_id": "a-1:b", "text": "x",
                       "end": True})  # fmt: skip
    assert (p.mode, p.instruct_text, p.speed, p.format, p.sample_rate, p.seed, p.request_id, p.end) == (
        "instruct2", "happy", 1.5, "wav", 24000, 7, "a-1:b", True)  # fmt: skip


@pytest.mark.parametrize(
    "fields, code",
    [
        ({}, "missing_field"),
        ({"voice": ""}, "invalid_field"),
        ({"voice": 3}, "invalid_field"),
        ({"voice": "v", "mode": "karaoke"}, "invalid_field"),
        ({"voice": "v", "mode": "instruct2", "instruct_text": "  "}, "missing_field"),
        ({"voice": "v", "speed": True}, "invalid_field"),
        ({"voice": "v", "speed": "1"}, "invalid_field"),
        ({"voice": "v", "speed": 0.4}, "invalid_field"),
        ({"voice": "v", "sample_rate": 24000.5}, "invalid_field"),
        ({"voice": "v", "seed": -1}, "invalid_field"),
        ({"voice": "v", "seed": True}, "invalid_field"),
        ({"voice": "v", "request_id": "has space"}, "invalid_field"),
        ({"voice": "v", "request_id": "x" * 129}, "invalid_field"),
        ({"voice": "v", "text": 5}, "invalid_field"),
        ({"voice": "v", "end": "yes"}, "invalid_field"),
    ],
)
def test_parse_start_rejects(fields, code):
    with pytest.raises(P.ProtocolError) as ei:
        P.parse_start({"type": "start", **fields})
    assert ei.value.code == code


@pytest.mark.parametrize(
    "raw, code",
    [("{", "invalid_json"), ("3", "invalid_json"), ("{}", "missing_field"), ('{"type": 1}', "unknown_type"),
     ('{"type": "run-task"}', "unknown_type"), ("[" * 100000, "invalid_json")],
)  # fmt: skip
def test_parse_message_rejects(raw, code):
    with pytest.raises(P.ProtocolError) as ei:
        P.parse_message(raw)
    assert ei.value.code == code


def test_parse_text():
    assert P.parse_text({"text": " "}) == " "
    for msg, code in (({}, "missing_field"), ({"text": 1}, "invalid_field"), ({"text": ""}, "empty_text")):
        with pytest.raises(P.ProtocolError) as ei:
            P.parse_text(msg)
        assert ei.value.code == code


def test_error_event_shape():
    import json

    assert json.loads(P.error_event("busy", "full")) == {"type": "error", "code": "busy", "message": "full"}
    assert json.loads(P.error_event("timeout", "t", "r1", True)) == {
        "type": "error", "code": "timeout", "message": "t", "request_id": "r1", "request_ended": True}  # fmt: skip
    assert len(set(P.ERROR_CODES)) == len(P.ERROR_CODES)


class _Err(Exception):
    def __init__(self, code):
        self.code = code


def test_engine_error_codes_mapped():
    assert engine_error_code(_Err("capacity")) == "busy"
    assert engine_error_code(_Err("unknown_voice")) == "unknown_voice"
    assert engine_error_code(_Err("context_full")) == "context_full"
    assert engine_error_code(RuntimeError("x")) == "internal"


# -- audio ------------------------------------------------------------------------------------------------
def test_wav_header_readable():
    pcm = float_to_pcm16(np.linspace(-1, 1, 100, dtype=np.float32))
    with wave.open(io.BytesIO(wav_header(16000, 100) + pcm)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 100)
    h = wav_header(24000)
    assert len(h) == 44 and h[4:8] == b"\xff\xff\xff\xff" and h[40:44] == b"\xff\xff\xff\xff"


def test_float_to_pcm16_clips_and_handles_nan():
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, np.nan, 0.5], dtype=np.float32)
    y = np.frombuffer(float_to_pcm16(x), dtype="<i2")
    assert y.tolist() == [0, 32767, -32767, 32767, -32767, 0, 16384]


def test_encoder_passthrough_and_wav_header_once():
    enc = PcmEncoder(24000, 24000, "wav")
    a = enc.encode(np.zeros(240, dtype=np.float32))
    b = enc.encode(np.zeros(240, dtype=np.float32))
    assert a[:4] == b"RIFF" and len(a) == 44 + 480 and len(b) == 480 and enc.finish() == b""
    assert enc.audio_seconds == pytest.approx(0.02)


def test_encoder_streaming_resample_keeps_length_and_tone():
    enc = PcmEncoder(24000, 16000, "pcm")
    t = np.arange(24000) / 24000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = b"".join(enc.encode(x[i : i + 2400]) for i in range(0, 24000, 2400)) + enc.finish()
    y = np.frombuffer(out, dtype="<i2").astype(np.float32) / 32767
    assert abs(len(y) - 16000) <= 2 and enc.samples_out == len(y)
    f = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y)
    assert abs(f - 440) < 3
    # no click at chunk edges: the resampled tone stays smooth
    assert np.max(np.abs(np.diff(y[200:-200]))) < 0.1


def test_encoder_rejects_unknown_format():
    with pytest.raises(ValueError):
        PcmEncoder(24000, 24000, "mp3")


# -- auth, admission --------------------------------------------------------------------------------------
def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_check_bearer():
    assert check_bearer(None, None) and check_bearer("", "anything")
    assert check_bearer("t0k", "Bearer t0k")
    assert not check_bearer("t0k", "Bearer t0k2")
    assert not check_bearer("t0k", None)
    assert not check_bearer("t0k", "t0k")


def test_admission():
    a = Admission(2)
    assert a.try_acquire() and a.try_acquire() and not a.try_acquire()
    a.release()
    assert a.try_acquire()
    a.release(), a.release()
    with pytest.raises(RuntimeError):
        a.release()
    with pytest.raises(ValueError):
        Admission(0)


# -- configuration ----------------------------------------------------------------------------------------
def test_parse_args_defaults_and_env_token():
    cfg = parse_args([], environ={AUTH_TOKEN_ENV: "envtok"})
    assert (cfg.host, cfg.port, cfg.gpu, cfg.backend, cfg.model_dir, cfg.dtype) == (
        "127.0.0.1", 8081, 0, "native", None, "fp32")  # fmt: skip
    assert cfg.auth_token == "envtok" and cfg.max_connections == 4 * cfg.max_sessions
    assert "envtok" not in repr(cfg)


def test_parse_args_flags():
    cfg = parse_args(
        ["--gpu", "3", "--port", "9000", "--backend", "vllm", "--host", "0.0.0.0", "--model-dir", "/m", "--fp16",
         "--max-sessions", "4", "--drain-timeout", "5", "--auth-token", "t", "--max-text-chars", "50"],
        environ={AUTH_TOKEN_ENV: "envtok"},
    )  # fmt: skip
    assert (cfg.gpu, cfg.port, cfg.backend, cfg.host, cfg.model_dir, cfg.dtype, cfg.max_sessions) == (
        3, 9000, "vllm", "0.0.0.0", "/m", "fp16", 4)  # fmt: skip
    assert (cfg.drain_timeout, cfg.auth_token, cfg.max_text_chars, cfg.max_connections) == (5.0, "t", 50, 16)
    assert (cfg.max_context, cfg.gpu_memory_fraction) == (4096, 0.9)
    cfg = parse_args(["--max-context", "2048", "--gpu-memory-fraction", "0.45"], environ={})
    assert (cfg.max_context, cfg.gpu_memory_fraction) == (2048, 0.45)
    assert cfg.eager_kernels is False and parse_args(["--eager-kernels"], environ={}).eager_kernels is True
    assert cfg.flow_memory_gib is None and parse_args(["--flow-memory-gib", "12.5"], environ={}).flow_memory_gib == 12.5
    assert cfg.lm_sms == 0 and parse_args(["--lm-sms", "32"], environ={}).lm_sms == 32
    assert cfg.flow_graph_past_pages is None
    assert parse_args(["--flow-graph-past-pages", "8"], environ={}).flow_graph_past_pages == 8
    assert cfg.vocoder is None and parse_args(["--vocoder", "thread"], environ={}).vocoder == "thread"


@pytest.mark.parametrize("argv, name, expected", [
    ([], "flow_memory_gib", "absent"), (["--flow-memory-gib", "0"], "flow_memory_gib", 0.0),
    (["--flow-memory-gib", "20"], "flow_memory_gib", 20.0),
    ([], "lm_sms", "absent"), (["--lm-sms", "0"], "lm_sms", "absent"), (["--lm-sms", "32"], "lm_sms", 32),
    ([], "compile_kernels", True), (["--eager-kernels"], "compile_kernels", False),
    ([], "paged_graph_past_pages", "absent"), (["--flow-graph-past-pages", "8"], "paged_graph_past_pages", 8),
    ([], "vocoder_mode", "absent"), (["--vocoder", "overlap"], "vocoder_mode", "overlap"),
])  # fmt: skip
def test_load_engine_passes_engine_options_as_given(monkeypatch, tmp_path, argv, name, expected):
    from cosyvoice_tts.engine import Engine
    from cosyvoice_tts.server.model import load_engine

    seen = {}

    class Started:
        def start(self):
            pass

    # load_engine passes what the signature names; "absent": the engine's own default applies
    def fake_load(model_dir, flow_memory_gib="absent", lm_sms="absent", compile_kernels="absent",
                  paged_graph_past_pages="absent", vocoder_mode="absent", **kwargs):
        seen.update(flow_memory_gib=flow_memory_gib, lm_sms=lm_sms, compile_kernels=compile_kernels,
                    paged_graph_past_pages=paged_graph_past_pages, vocoder_mode=vocoder_mode)
        return Started()

    monkeypatch.setattr(Engine, "load", fake_load)
    load_engine(parse_args(["--model-dir", str(tmp_path)] + argv, environ={}), "cpu", "fp32")
    assert seen[name] == expected


@pytest.mark.parametrize(
    "argv",
    [["--backend", "tensorrt"], ["--max-sessions", "0"], ["--port", "70000"], ["--fp16", "--dtype", "bf16"],
     ["--drain-timeout", "-1"], ["--max-context", "100"], ["--gpu-memory-fraction", "0"],
     ["--gpu-memory-fraction", "1.5"], ["--flow-memory-gib", "-1"], ["--lm-sms", "-8"],
     ["--flow-graph-past-pages", "-1"], ["--vocoder", "inline"]],
)  # fmt: skip
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        parse_args(argv, environ={})
    assert ei.value.code not in (0, None)


def test_cache_dir():
    assert cache_dir({CACHE_ENV: "/x/y"}) == "/x/y"
    assert cache_dir({}).endswith(".cache/cosyvoice_tts")


def test_worker_id_default():
    assert ServerConfig(worker_id="w").default_worker_id(1) == "w"
    assert ServerConfig().default_worker_id(8123).endswith(":8123")


def test_vllm_backend_without_vllm_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(StartupError, match="vllm"):
        check_backend("vllm")
    check_backend("native")


def test_cpu_device_is_logged(caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with caplog.at_level(logging.WARNING, logger="cosyvoice_tts.server"):
        assert resolve_device(0) == "cpu"
    assert "running on CPU" in caplog.text
    assert resolve_dtype("fp16", "cpu") == "fp32" and resolve_dtype("bf16", "cuda:0") == "bf16"


def test_register_voices_from_dir(tmp_path):
    import soundfile as sf

    from cosyvoice_tts.server.model import register_voices

    calls = []

    class Eng:
        def register_voice(self, voice_id, wav, sample_rate, prompt_text):
            calls.append((voice_id, wav.shape, wav.dtype, sample_rate, prompt_text))

    sf.write(tmp_path / "amy.wav", np.zeros((1600, 2), dtype=np.float32), 16000)
    (tmp_path / "amy.txt").write_text(" Hello, I am Amy. \n", encoding="utf-8")
    assert register_voices(Eng(), str(tmp_path)) == ["amy"]
    assert calls == [("amy", (1600,), np.float32, 16000, "Hello, I am Amy.")]
    sf.write(tmp_path / "bob.wav", np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(StartupError, match="bob.txt"):
        register_voices(Eng(), str(tmp_path))
    with pytest.raises(StartupError, match="not a directory"):
        register_voices(Eng(), str(tmp_path / "missing"))
