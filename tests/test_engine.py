"""The engine end to end on the tiny random model (CPU): loading, modes, streaming, isolation, cancellation."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from concurrent_audio import audio_of_all
from cosyvoice_tts.engine import CapacityError, Engine, InvalidRequestError, SynthesisParams, UnknownVoiceError
from cosyvoice_tts.engine.loader import ModelDirError, build_modules

TEXT_ZH = "你好，今天天气很好。我们一起去公园散步吧，顺便买点水果回来。"
TEXT_EN = "Hello there, this is a short test of the streaming speech engine."


def synth(engine, text, **params) -> tuple[np.ndarray, dict]:
    request = engine.submit(SynthesisParams(**{"voice": "中文女", "seed": 3, **params}), text=text)
    audio = request.audio()
    return audio, request.summary


def test_strict_loading_names_file_and_key(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = torch.load(broken / "flow.pt")
    key = next(k for k in state if k.startswith("encoder."))
    state[key.replace("encoder.", "encoder_renamed.", 1)] = state.pop(key)
    torch.save(state, broken / "flow.pt")
    with pytest.raises(ModelDirError) as info:
        build_modules(broken)
    message = str(info.value)
    assert "flow.pt" in message and key in message and "encoder_renamed." in message


def test_missing_release_file_is_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "hift.pt").unlink()
    with pytest.raises(ModelDirError, match="hift.pt"):
        build_modules(broken)


def test_same_seed_same_audio_and_lengths_follow_text(engine):
    first, summary = synth(engine, TEXT_ZH)
    second, _ = synth(engine, TEXT_ZH)
    assert summary["outcome"] == "ok" and first.size > 0
    np.testing.assert_array_equal(first, second)
    other, _ = synth(engine, TEXT_ZH, seed=4)
    assert other.shape != first.shape or not np.array_equal(other, first)
    # output tokens within the model's 2x..20x of the text tokens
    assert 2 * summary["text_tokens"] <= summary["speech_tokens"] <= 20 * summary["text_tokens"]
    assert abs(summary["audio_s"] - summary["speech_tokens"] / 25) < 0.05


def test_streaming_mel_equals_one_pass_and_joins_are_smooth(engine, monkeypatch):
    mels = {True: [], False: []}
    real_vocode = engine.token2wav._vocode_batch

    def recording(states, new_mels, finalizes, generators):
        for state, mel in zip(states, new_mels):
            mels[state.stream].append(mel.clone())
        return real_vocode(states, new_mels, finalizes, generators)

    monkeypatch.setattr(engine.token2wav, "_vocode_batch", recording)
    text = TEXT_EN + " " + TEXT_EN
    streamed, s1 = synth(engine, text, stream=True)
    whole, s2 = synth(engine, text, stream=False)
    assert s1["speech_tokens"] == s2["speech_tokens"]  # same seed: the LM does not depend on chunking
    assert len(mels[True]) > 2 and len(mels[False]) == 1
    assert streamed.shape == whole.shape
    joined = torch.cat(mels[True], dim=2)  # each chunk's new frames (the vocoder adds its cached frames itself)
    reference = mels[False][0]
    assert joined.shape == reference.shape
    frames_flow_streamed = joined.shape[2]
    assert frames_flow_streamed > 0
    # The one-pass run uses full attention in the flow (upstream's non-streaming mode), so compare envelopes.
    assert torch.corrcoef(torch.stack([joined.flatten(), reference.flatten()]))[0, 1] > 0.5

    # No clicks: the step at each join is like the steps inside chunks.
    steps = np.abs(np.diff(streamed))
    chunk_lengths = [m.shape[2] * 480 for m in mels[True]]
    joins, pos = [], 0
    for n in chunk_lengths[:-1]:
        pos += n - engine.stream_config.source_cache_len if pos == 0 else n - 2 * engine.stream_config.source_cache_len
        joins.append(pos)
    typical = np.percentile(steps, 99)
    for j in joins:
        if 0 < j < steps.size:
            assert steps[j - 1] <= 3 * typical + 1e-6


def test_interleaved_requests_equal_each_alone(engine):
    alone_a, _ = synth(engine, TEXT_ZH, seed=21)
    alone_b, _ = synth(engine, TEXT_EN, voice="英文男", seed=22)
    req_a = engine.submit(SynthesisParams(voice="中文女", seed=21), text=TEXT_ZH)
    req_b = engine.submit(SynthesisParams(voice="英文男", seed=22), text=TEXT_EN)
    results = {}
    threads = [threading.Thread(target=lambda r=r, k=k: results.__setitem__(k, r.audio()))
               for k, r in (("a", req_a), ("b", req_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    np.testing.assert_allclose(results["a"], alone_a, atol=1e-5)
    np.testing.assert_allclose(results["b"], alone_b, atol=1e-5)


def test_a_request_prefilled_beside_running_decodes_equals_it_alone(engine, monkeypatch):
    """A request arriving while another decodes is prefilled in the same step as that decode, both read back
    together (Engine.prefill_with_decode): its audio is the audio it has alone."""
    alone, _ = synth(engine, TEXT_EN, voice="英文男", seed=23)
    before = engine.counters["prefills_with_decode"]
    launches, late = [], []
    launch_decode = engine.runner.launch_decode

    def submit_late_on_the_fifth_step(rows):
        # From the loop itself, so the arrival surely lands while the first request is still decoding.
        launches.append(len(rows))
        if len(launches) == 5:
            late.append(engine.submit(SynthesisParams(voice="英文男", seed=23), text=TEXT_EN))
        return launch_decode(rows)

    monkeypatch.setattr(engine.runner, "launch_decode", submit_late_on_the_fifth_step)
    running = engine.submit(SynthesisParams(voice="中文女", seed=24), text=TEXT_ZH * 2)
    running.audio()
    assert late and engine.counters["prefills_with_decode"] > before
    np.testing.assert_allclose(late[0].audio(), alone, atol=1e-5)


def test_cancel_frees_state(engine):
    request = engine.submit(SynthesisParams(voice="中文女", seed=5), text=TEXT_ZH * 4)
    iterator = iter(request)
    next(iterator)  # at least one chunk arrived
    request.cancel()
    rest = list(iterator)
    assert request.stats.outcome == "cancelled"
    assert len(rest) < 20
    deadline = time.monotonic() + 10
    while engine.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_count() == 0
    assert engine.runner.cache.free_slots() == engine.max_sessions


def test_bistream_audio_before_text_ends(engine):
    request = engine.submit(SynthesisParams(voice="英文女", seed=9))
    words = ((TEXT_EN + " ") * 12).split()  # far more text than the first chunk needs
    got_early = False
    for word in words:
        request.push_text(word + " ")
        time.sleep(0.05)
        if request.stats.first_chunk_at is not None:
            got_early = True
            break
    request.end_text()
    audio = request.audio()
    assert got_early, "no audio arrived while text was still streaming"
    assert audio.size > 0 and request.stats.outcome == "ok"


def test_zero_shot_voice_registration_and_modes(engine):
    rng = np.random.default_rng(0)
    prompt = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    engine.register_voice("alice", prompt, 16000, "希望你以后能够做的比我还好呦。")
    assert "alice" in engine.voices()
    for mode, extra in (("zero_shot", {}), ("cross_lingual", {}), ("instruct2", {"instruct_text": "用四川话说这句话"})):
        audio, summary = synth(engine, TEXT_ZH, voice="alice", mode=mode, **extra)
        assert summary["outcome"] == "ok" and audio.size > 0, mode
    with pytest.raises(InvalidRequestError):
        synth(engine, TEXT_ZH, voice="alice", mode="instruct2")
    with pytest.raises(InvalidRequestError):
        synth(engine, TEXT_ZH, voice="中文女", mode="zero_shot")


def test_bad_requests_are_refused(engine):
    with pytest.raises(UnknownVoiceError):
        engine.submit(SynthesisParams(voice="nobody"), text="hi")
    with pytest.raises(InvalidRequestError):
        engine.submit(SynthesisParams(voice="中文女"), text="   ")
    with pytest.raises(InvalidRequestError):
        engine.submit(SynthesisParams(voice="中文女", speed=9.0), text="hi")


def test_capacity_is_enforced(engine):
    requests = [engine.submit(SynthesisParams(voice="中文女", seed=i), text=TEXT_ZH) for i in range(engine.max_sessions)]
    with pytest.raises(CapacityError):
        engine.submit(SynthesisParams(voice="中文女"), text=TEXT_ZH)
    for request in requests:
        request.cancel()
        list(request)


def test_request_alone_equals_batched_with_31_others(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, max_sessions=32)
    engine.start()
    try:
        texts = [f"第{i}句话。" if i % 2 else f"Sentence number {i}." for i in range(32)]
        requests = [engine.submit(SynthesisParams(voice="中文女" if i % 2 else "英文女", seed=100 + i), text=t)
                    for i, t in enumerate(texts)]
        results = audio_of_all(requests)
        assert engine.counters["decode_rows"] > engine.counters["steps"]  # they really shared decode steps
        for i in (0, 7, 20, 31):
            alone = engine.submit(SynthesisParams(voice="中文女" if i % 2 else "英文女", seed=100 + i), text=texts[i])
            audio = alone.audio()
            batched_audio, batched_summary = results[i]
            assert alone.summary["speech_tokens"] == batched_summary["speech_tokens"]
            assert audio.shape == batched_audio.shape
            np.testing.assert_allclose(batched_audio, audio, atol=1e-4)
    finally:
        engine.shutdown()


def test_a_request_being_admitted_is_always_counted(tiny_model_dir):
    """submit() counts pending + active under the lock; admission must never leave a request in neither, or
    one more request than there are KV slots gets in (seen as a CacheFullError that killed the loop)."""
    engine = Engine.load(tiny_model_dir, max_sessions=2)  # not started: _admit is driven by hand
    for seed in range(2):
        engine.submit(SynthesisParams(voice="中文女", seed=seed), text=TEXT_ZH)
    allocate, seen = engine.runner.cache.allocate, []

    def allocate_and_look():
        seen.append(engine.active_count())
        return allocate()

    engine.runner.cache.allocate = allocate_and_look
    engine._admit()
    assert seen == [2, 2]
    with pytest.raises(CapacityError):
        engine.submit(SynthesisParams(voice="中文女"), text=TEXT_ZH)
