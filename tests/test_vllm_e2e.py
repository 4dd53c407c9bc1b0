"""The LM on real vLLM (CPU build here): the registered architecture, prompt embeddings, the RAS logits processor,
and VllmEngine end to end on a tiny model. Skips, naming what is missing, where vLLM cannot run."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from cosyvoice_tts.vllm_backend import vllm_unavailable_reason

REASON = vllm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vLLM backend cannot run here: {REASON}")

TEXT = "Hello there, this is a short test of the streaming speech engine."


@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with head_dim 32 (vLLM's CPU attention has no 16-wide heads)."""
    from cosyvoice_tts.vllm_backend.testing import make_vllm_tiny_model

    return make_vllm_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "tiny32")


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    from cosyvoice_tts.vllm_backend import VllmEngine

    engine = VllmEngine.load(vllm_model_dir, max_sessions=4, max_context=1024)
    engine.start()
    yield engine
    engine.shutdown()


def _run(engine, coro):
    return asyncio.run_coroutine_threadsafe(coro, engine._aloop).result(timeout=300)


def test_ras_logits_processor_rows(engine):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from cosyvoice_tts.vllm_backend.logits import EXTRA_KEY, RasLogitsProcessor
    from cosyvoice_tts.vllm_backend.ras import ras_logprobs, window_tensor

    def params(history, mask):
        return SamplingParams(extra_args={EXTRA_KEY: {"top_k": 5, "top_p": 0.8, "win_size": 10, "tau_r": 0.1,
                                                      "eos": 9, "history": history, "mask_eos_steps": mask}})

    proc = RasLogitsProcessor(None, torch.device("cpu"), False)
    out_a, out_c = [1, 2], []
    proc.update_state(BatchUpdate(3, [], [(0, params([3, 3], 5), None, out_a), (1, SamplingParams(), None, []),
                                          (2, params([], 0), None, out_c)], []))
    logits = torch.randn(3, 10)
    before = logits.clone()
    got = proc.apply(logits.clone())
    assert torch.equal(got[1], before[1])  # a request without RAS passes through
    expect_a = ras_logprobs(before[:1], window_tensor([[3, 3, 1, 2]], 10), torch.tensor([5]), torch.tensor([0.8]),
                            torch.tensor([1.0]), torch.tensor([True]), torch.tensor([9]))
    expect_c = ras_logprobs(before[2:], window_tensor([[]], 10), torch.tensor([5]), torch.tensor([0.8]),
                            torch.tensor([1.0]), torch.tensor([False]), torch.tensor([9]))
    torch.testing.assert_close(got[0], expect_a[0])
    torch.testing.assert_close(got[2], expect_c[0])
    # moves and removals follow the request, and the live output list extends the window
    proc.update_state(BatchUpdate(2, [1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    out_c.extend([4, 4])
    got = proc.apply(before[[0, 2]].clone())
    expect_c = ras_logprobs(before[2:], window_tensor([[4, 4]], 10), torch.tensor([5]), torch.tensor([0.8]),
                            torch.tensor([1.0]), torch.tensor([False]), torch.tensor([9]))
    torch.testing.assert_close(got[1], expect_c[0])


def test_vllm_log_probs_equal_the_native_lm(engine, vllm_model_dir):
    """Same prompt embeddings, same tokens: vLLM's raw log-probs of each sampled token equal our LM's."""
    from vllm import SamplingParams

    from cosyvoice_tts.engine.loader import build_modules
    from cosyvoice_tts.engine.model_runner import DecodeRow, ModelRunner

    context = [("sos", []), ("text", list(range(20, 32))), ("task", []), ("speech", [11, 12, 13])]
    prompt = {"prompt_embeds": engine.embed_context(context)}

    async def generate():
        final = None
        async for output in engine.vllm.generate(prompt, SamplingParams(max_tokens=12, top_k=25, seed=3, logprobs=1,
                                                                        detokenize=False, ignore_eos=True),
                                                 "logprob-check"):
            final = output
        return final

    completion = _run(engine, generate()).outputs[0]
    tokens = list(completion.token_ids)
    vllm_logps = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]

    llm = build_modules(vllm_model_dir).llm.eval()
    runner = ModelRunner(llm, torch.device("cpu"), torch.float32, 1, 256, False)
    logp = runner.extend(0, 0, context)
    position = 18
    native = []
    for token in tokens:
        native.append(float(logp[token]))
        logp = runner.decode([DecodeRow(0, position, token)])[0].logp
        position += 1
    np.testing.assert_allclose(vllm_logps, native, atol=2e-4)


def test_whole_text_same_seed_same_audio(engine):
    from cosyvoice_tts.engine import SynthesisParams

    first = engine.submit(SynthesisParams(voice="英文女", seed=7), text=TEXT)
    audio = first.audio()
    again = engine.submit(SynthesisParams(voice="英文女", seed=7), text=TEXT).audio()
    assert first.stats.outcome == "ok" and audio.size > 0
    assert first.stats.speech_tokens >= 2 * first.stats.text_tokens
    np.testing.assert_array_equal(audio, again)
    assert engine.stats()["info"] == {"backend": "vllm", "sampling": "ras", "vllm_version": engine.vllm_version}


def test_bistream_and_zero_shot(engine):
    from cosyvoice_tts.engine import SynthesisParams

    request = engine.submit(SynthesisParams(voice="英文女", seed=9))
    for word in (TEXT + " " + TEXT).split():
        request.push_text(word + " ")
        time.sleep(0.01)
    request.end_text()
    audio = request.audio()
    assert request.stats.outcome == "ok" and audio.size > 0

    rng = np.random.default_rng(0)
    engine.register_voice("alice", (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32), 16000,
                          "A short prompt transcript.")
    request = engine.submit(SynthesisParams(voice="alice", mode="zero_shot", seed=1), text=TEXT)
    assert request.audio().size > 0 and request.stats.outcome == "ok"


def test_cancel_aborts_the_vllm_request(engine):
    from cosyvoice_tts.engine import SynthesisParams

    request = engine.submit(SynthesisParams(voice="英文女", seed=5))  # bistream without end: vLLM keeps decoding
    request.push_text(TEXT * 3)
    deadline = time.monotonic() + 60
    while engine.vllm.get_num_unfinished_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.vllm.get_num_unfinished_requests() > 0
    request.cancel()
    list(request)
    assert request.stats.outcome == "cancelled"
    deadline = time.monotonic() + 30
    while (engine.vllm.get_num_unfinished_requests() or engine.active_count()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.vllm.get_num_unfinished_requests() == 0 and engine.active_count() == 0
