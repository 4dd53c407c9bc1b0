"""The cloud CosyVoice (DashScope) WebSocket protocol: ``run-task`` validation (pure), and the session in process
against the TEST-ONLY fake engine of test_server.py (engine failures, drain, not-ready, frame order) with the real
``dashscope`` SDK and raw WebSocket clients. The real worker process is covered by tests/e2e/test_protocols_e2e.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from test_server import SR, FakeEngine, Harness, run
from websockets.asyncio.client import connect

from cosyvoice_tts.server import dashscope as D
from cosyvoice_tts.server.compat import billed_characters

dashscope = pytest.importorskip("dashscope", reason="the dashscope SDK is a test dependency (pip install dashscope)")
from dashscope.audio.tts_v2 import AudioFormat, SpeechSynthesizer  # noqa: E402
from dashscope.common.error import RequestFailure  # noqa: E402


def run_msg(**params) -> dict:
    p = {"voice": "alice"}
    p.update(params)
    return {"header": {"action": "run-task", "task_id": "t1", "streaming": "duplex"},
            "payload": {"model": "cosyvoice-v2", "task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                        "input": {}, "parameters": p}}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# pure parsing
def test_run_task_defaults_follow_the_sdk():
    # what dashscope 2.x sends for AudioFormat.DEFAULT: format "Default", sample_rate 0 -> mp3 at 22050 Hz
    spec = D.parse_run_task(run_msg(format="Default", sample_rate=0, volume=50, rate=1.0, pitch=1.0, seed=0, type=0,
                                    text_type="PlainText"), "t1")  # fmt: skip
    assert (spec.format, spec.sample_rate, spec.gain, spec.speed, spec.seed) == ("mp3", 22050, 1.0, 1.0, 0)
    assert spec.instruction is None and spec.text is None and not spec.enable_ssml
    spec = D.parse_run_task(run_msg(format="PCM", sample_rate=16000, volume=100, rate=1.5, instruction=" calm ",
                                    language_hints=["en"], enable_ssml=True, enable_markdown_filter=True), "t1")
    assert (spec.format, spec.sample_rate, spec.gain, spec.speed) == ("pcm", 16000, 2.0, 1.5)
    assert spec.instruction == "calm" and spec.enable_ssml
    msg = run_msg()
    msg["payload"]["input"] = {"text": ""}  # older SDKs
    assert D.parse_run_task(msg, "t1").text is None
    msg["payload"]["input"] = {"text": "Hi."}
    assert D.parse_run_task(msg, "t1").text == "Hi."


@pytest.mark.parametrize(
    ("params", "code", "needle"),
    [
        ({"voice": None}, "missing_field", "voice"),
        ({"voice": ""}, "invalid_field", "voice"),
        ({"format": "opus", "bit_rate": 64}, "unsupported", "opus"),
        ({"format": 3}, "invalid_field", "format"),
        ({"bit_rate": 64}, "unsupported", "bit_rate"),
        ({"sample_rate": 12345}, "invalid_field", "sample_rate"),
        ({"sample_rate": 16000.5}, "invalid_field", "sample_rate"),
        ({"volume": -1}, "invalid_field", "volume"),
        ({"volume": "50"}, "invalid_field", "volume"),
        ({"rate": 2.5}, "invalid_field", "rate"),
        ({"pitch": 1.2}, "unsupported", "pitch"),
        ({"text_type": "SSML"}, "unsupported", "text_type"),
        ({"seed": 70000}, "invalid_field", "seed"),
        ({"seed": True}, "invalid_field", "seed"),
        ({"type": 1}, "unsupported", "type"),
        ({"instruction": "x" * 1001}, "invalid_field", "instruction"),
        ({"language_hints": "en"}, "invalid_field", "language_hints"),
        ({"enable_ssml": "yes"}, "invalid_field", "enable_ssml"),
        ({"enable_markdown_filter": False}, "unsupported", "markdown"),
        ({"hot_fix": {}}, "unsupported", "hot_fix"),
    ],
)
def test_run_task_rejects(params, code, needle):
    msg = run_msg(**params)
    if params.get("voice", "x") is None:
        del msg["payload"]["parameters"]["voice"]
    with pytest.raises(D.P.ProtocolError) as ei:
        D.parse_run_task(msg, "t1")
    assert ei.value.code == code and needle in ei.value.message


def test_run_task_payload_and_header_checks():
    for mutate, code in (
        (lambda m: m["payload"].update(model=""), "missing_field"),
        (lambda m: m["payload"].pop("parameters"), "missing_field"),
        (lambda m: m["payload"].update(task="asr"), "unsupported"),
        (lambda m: m["payload"].update(input="text"), "invalid_field"),
        (lambda m: m.update(payload=[]), "invalid_field"),
    ):
        msg = run_msg()
        mutate(msg)
        with pytest.raises(D.P.ProtocolError) as ei:
            D.parse_run_task(msg, "t1")
        assert ei.value.code == code
    assert D.parse_header(run_msg())[1:] == ("run-task", "t1")
    for header, code in (({"action": "run-task"}, "missing_field"), ({"task_id": "t"}, "missing_field"),
                         ({"action": "stop", "task_id": "t"}, "unknown_type"),
                         ({"action": "run-task", "task_id": "x" * 129}, "missing_field"),
                         ({"action": "run-task", "task_id": "t", "streaming": "out"}, "unsupported")):  # fmt: skip
        with pytest.raises(D.P.ProtocolError) as ei:
            D.parse_header({"header": header})
        assert ei.value.code == code


def test_mp3_unavailable_is_reported_not_substituted(monkeypatch):
    monkeypatch.setattr(D, "mp3_unavailable_reason", lambda: "mp3 output needs the 'lameenc' package")
    with pytest.raises(D.P.ProtocolError) as ei:
        D.parse_run_task(run_msg(format="Default", sample_rate=0), "t1")
    assert ei.value.code == "unsupported" and "lameenc" in ei.value.message
    assert D.parse_run_task(run_msg(format="pcm"), "t1").format == "pcm"


def test_billed_characters_and_error_codes():
    assert billed_characters("你好, ok") == 2 * 2 + 4
    assert D.cloud_error_code("busy") == "Throttling" and D.cloud_error_code("draining") == "ServiceUnavailable"
    assert D.cloud_error_code("unknown_voice") == "InvalidParameter"
    assert D.cloud_error_code("internal") == "InternalError"
    ev = json.loads(D.task_failed("t9", "timeout", "no text"))
    assert ev == {"header": {"task_id": "t9", "event": "task-failed", "error_code": "RequestTimeout",
                             "error_message": "timeout: no text", "attributes": {}}, "payload": {}}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# in process, fake engine
def ds_url(h) -> str:
    return f"ws://127.0.0.1:{h.server.port}/api-ws/v1/inference"


def msg(action: str, task_id: str, **inp) -> str:
    return json.dumps({"header": {"action": action, "task_id": task_id, "streaming": "duplex"},
                       "payload": {"input": inp}})  # fmt: skip


async def recv_json(ws, timeout=10):
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, str):
            return json.loads(m)


def test_sdk_call_and_frame_order_with_fake_engine(monkeypatch):
    monkeypatch.setattr(dashscope, "api_key", "k")

    async def main():
        eng = FakeEngine(chunks_per_segment=3)
        async with Harness(eng) as h:
            # raw: every binary frame follows a sentence-synthesis event; sentences begin when handed over
            async with connect(ds_url(h)) as ws:
                tid = "task id with spaces"  # not a valid request id of /ws: the worker uses its own, events keep this
                await ws.send(json.dumps({
                    "header": {"action": "run-task", "task_id": tid, "streaming": "duplex"},
                    "payload": {"model": "m", "task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                                "input": {}, "parameters": {"voice": "alice", "format": "pcm", "sample_rate": 24000,
                                                            "seed": 3}}}))  # fmt: skip
                assert (await recv_json(ws))["header"] == {"task_id": tid, "event": "task-started", "attributes": {}}
                await ws.send(msg("continue-task", tid, text="First sentence. Then"))
                await ws.send(msg("continue-task", tid, text=" words.", flush=True))
                await ws.send(msg("finish-task", tid))
                frames = []
                while True:
                    m = await asyncio.wait_for(ws.recv(), 10)
                    frames.append(m if isinstance(m, bytes) else json.loads(m))
                    if isinstance(frames[-1], dict) and frames[-1]["header"]["event"] != "result-generated":
                        break
                assert frames[-1]["header"]["event"] == "task-finished"
                assert frames[-1]["payload"]["usage"] == {"characters": len("First sentence. Then words.")}
                for i, f in enumerate(frames):
                    if isinstance(f, bytes):
                        assert frames[i - 1]["payload"]["output"]["type"] == "sentence-synthesis"
                kinds = [f["payload"]["output"]["type"] for f in frames if isinstance(f, dict) and
                         f["header"]["event"] == "result-generated"]  # fmt: skip
                assert kinds[0] == "sentence-begin" and kinds[-2:] == ["sentence-end", "sentence-end"]
                assert eng.requests[-1].pushed == ["First sentence.", "Then words."]
                assert eng.requests[-1].params.seed == 3
                audio = b"".join(f for f in frames if isinstance(f, bytes))
                assert len(audio) == 2 * 3 * 2 * int(0.1 * SR)
            # the SDK's plain call, pcm at 16 kHz
            url = ds_url(h) + "/"

            def call():
                syn = SpeechSynthesizer(model="m", voice="bob", format=AudioFormat.PCM_16000HZ_MONO_16BIT, url=url)
                return syn.call("Hello there.", timeout_millis=20_000)

            audio = await asyncio.to_thread(call)
            assert abs(len(audio) - 2 * 3 * 1600) <= 64  # 3 chunks of 0.1 s, resampled to 16 kHz

    run(main())


def test_engine_failure_not_ready_and_draining_end_tasks(monkeypatch):
    monkeypatch.setattr(dashscope, "api_key", "k")

    async def main():
        eng = FakeEngine()
        async with Harness(eng) as h:

            def fail_call():
                syn = SpeechSynthesizer(model="m", voice="fail", format=AudioFormat.PCM_24000HZ_MONO_16BIT,
                                        url=ds_url(h))  # fmt: skip
                return syn.call("Boom.", timeout_millis=20_000)

            with pytest.raises(RequestFailure) as ei:
                await asyncio.to_thread(fail_call)
            assert ei.value.name == "InternalError" and ei.value.message.startswith("generation_failed:")
            async with connect(ds_url(h)) as ws:
                h.server.ready = False
                await ws.send(json.dumps(run_msg()))
                ev = await recv_json(ws)
                assert D.cloud_error_code("not_ready") == ev["header"]["error_code"] == "ServiceUnavailable"
                assert ev["header"]["error_message"].startswith("not_ready:")
                h.server.ready = True
                h.server.draining = True
                await ws.send(json.dumps(run_msg()))
                ev = await recv_json(ws)
                assert ev["header"]["error_message"].startswith("draining:")
                h.server.draining = False
                # a bug while handling a message ends the task with InternalError; the worker goes on
                await ws.send(json.dumps(run_msg()))
                assert (await recv_json(ws))["header"]["event"] == "task-started"

                async def boom(self, m, t):
                    raise RuntimeError("bug")

                monkeypatch.setattr(D.DashScopeSession, "_continue_task", boom)
                await ws.send(msg("continue-task", "t1", text="Hi."))
                ev = await recv_json(ws)
                assert ev["header"]["error_code"] == "InternalError" and ev["header"]["task_id"] == "t1"
                assert h.server.admission.active == 0

    run(main())


def test_drain_timeout_fails_running_task():
    async def main():
        eng = FakeEngine(interval=0.05, chunks_per_segment=1000)
        async with Harness(eng) as h, connect(ds_url(h)) as ws:
            await ws.send(json.dumps(run_msg(format="pcm")))
            assert (await recv_json(ws))["header"]["event"] == "task-started"
            await ws.send(msg("continue-task", "t1", text="Endless.", flush=True))
            assert isinstance(await asyncio.wait_for(ws.recv(), 10), (bytes, str))
            assert await h.server.drain(timeout=0.2) is False
            while True:
                ev = await recv_json(ws)
                if ev["header"]["event"] != "result-generated":
                    break
            assert ev["header"]["event"] == "task-failed" and ev["header"]["error_code"] == "ServiceUnavailable"
            assert ev["header"]["error_message"].startswith("draining:") and eng.requests[-1].cancelled

    run(main())
