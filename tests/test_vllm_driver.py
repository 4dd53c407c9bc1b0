"""The vLLM backend's logic without vLLM: RAS as a distribution, the driver's contexts against native stepping,
and VllmEngine end to end with a pure-torch stand-in for vLLM (`testing.TorchLMClient`)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from cosyvoice_tts.engine import SynthesisParams
from cosyvoice_tts.engine.lm_program import BistreamProgram, WholeTextProgram
from cosyvoice_tts.engine.sampling import RasConfig, TokenRng, sample_token
from cosyvoice_tts.vllm_backend.driver import LMDriver, Segment
from cosyvoice_tts.vllm_backend.ras import ras_logprobs, window_tensor

EOS = 6561
FILL = EOS + 2


# --- RAS as a distribution ---------------------------------------------------------------------------
def _q(logp, decoded, cfg, eos, mask_eos):
    return ras_logprobs(logp.unsqueeze(0), window_tensor([decoded], cfg.win_size), torch.tensor([cfg.top_k]),
                        torch.tensor([cfg.top_p]), torch.tensor([cfg.win_size * cfg.tau_r]),
                        torch.tensor([mask_eos]), torch.tensor([eos]))[0].exp()


@pytest.mark.parametrize("decoded,mask_eos", [([], False), ([3, 1, 3, 0], False), ([0, 1, 2, 3, 4], True)])
def test_ras_distribution_matches_the_reference_sampler(decoded, mask_eos):
    torch.manual_seed(0)
    vocab, eos = 10, 9
    logp = (torch.randn(vocab) * 1.5).log_softmax(0)
    logp[eos] = logp.max() - 0.3  # eos likely enough to matter
    logp = logp.log_softmax(0)
    cfg = RasConfig(top_p=0.8, top_k=5, win_size=10, tau_r=0.1)
    q = _q(logp, decoded, cfg, eos, mask_eos)
    assert torch.isclose(q.sum(), torch.tensor(1.0), atol=1e-5)
    if mask_eos:
        assert q[eos] == 0
    generator = TokenRng(1)
    draws = 20000
    counts = torch.zeros(vocab)
    for _ in range(draws):
        counts[sample_token(logp, decoded, cfg, generator, eos, ignore_eos=mask_eos)] += 1
    freq = counts / draws
    assert (freq - q).abs().max() < 0.015, (freq, q)


def test_ras_without_repeats_is_the_nucleus():
    logp = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0]).log_softmax(0)
    cfg = RasConfig(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    q = _q(logp, [], cfg, 5, False)
    p = logp.exp()
    kept = []
    mass = 0.0
    for i in range(6):  # the reference rule: keep while the mass before is under top_p
        if mass >= cfg.top_p:
            break
        kept.append(i)
        mass += float(p[i])
    expected = torch.zeros(6)
    expected[kept] = p[kept] / p[kept].sum()
    assert torch.allclose(q, expected, atol=1e-6)


def test_window_tensor_pads_and_drops_placeholders():
    w = window_tensor([[1, 2, -1], list(range(20))], 4)
    assert w.tolist() == [[-1, -1, 1, 2], [16, 17, 18, 19]]


# --- the driver against native stepping ------------------------------------------------------------------
def _flatten(pieces):
    out = []
    for kind, ids in pieces:
        if kind in ("sos", "task"):
            out.append((kind,))
        else:
            out.extend((kind, int(i)) for i in ids)
    return out


def whole_script(program):
    """Speech tokens, with special tokens (re-feed) at steps 2 and 5 and eos once it is allowed."""
    n = program.steps
    if n == 2:
        return EOS + 2
    if n == 5:
        return EOS + 1
    if n >= program.min_len + 3:
        return EOS
    return 100 + 7 * n


def bistream_script(program):
    """A sampled fill at index 3, forced fills after, final phase of 6 tokens then eos."""
    n = len(program.decoded)
    if program.final:
        start = program.__dict__.setdefault("_final_start", n)
        return EOS if n - start >= 6 else 200 + n
    return FILL if n == 3 else 300 + n


def native_fed(program, script):
    """What the native engine feeds, step by step (take_input, forward, on_logprobs), with scripted samples."""
    fed, samples = [], 0

    def sample(_logp, ignore_eos):
        nonlocal samples
        token = script(program)
        assert not (ignore_eos and token == EOS), "script drew eos where the programme forbids it"
        samples += 1
        return token

    program._sample = sample
    while not program.done:
        assert program.runnable()
        fed.extend(_flatten(program.take_input()))
        program.on_logprobs(None)
    return fed, samples


class ScriptedClient:
    """An LM server whose samples follow a script; checks the SubRequest allows each of them."""

    def __init__(self, segment_ref, script):
        self.segment_ref = segment_ref
        self.script = script
        self.contexts = []
        self.server_fed = []
        self.samples = 0

    async def generate(self, context, spec, request_id):
        self.contexts.append(_flatten(context))
        program = self.segment_ref[0].program
        generated = []
        try:
            for produced in range(spec.max_tokens):
                token = self.script(program)
                masked = spec.mask_eos_steps < 0 or produced < spec.mask_eos_steps
                assert not (token == EOS and masked), "eos masked where the reference allows it"
                self.samples += 1
                generated.append(token)
                yield [token]
                await asyncio.sleep(0)
                if token in spec.stop_token_ids:
                    return
        finally:
            # what the server itself fed: the prompt, then every sampled token it went on from
            self.server_fed.append(_flatten(context) + [("speech", t) for t in generated[:-1]])


def drive_scripted(program, script, text_items=()):
    ref = [None]
    client = ScriptedClient(ref, script)
    posted = []
    driver = LMDriver(client, RasConfig(), 4096, lambda seg, tokens, done: posted.append((list(tokens), done)))
    segment = Segment(program, "req")
    ref[0] = segment

    async def main():
        segment.inbox = asyncio.Queue()
        for item in text_items:
            segment.inbox.put_nowait(item)
        await driver.drive(segment)

    asyncio.run(main())
    return segment, client, posted


def _check_equivalent(make_program, script, text_items=()):
    native = make_program()
    for kind, value in text_items:
        native.push_text(value) if kind == "text" else native.end_text()
    expected, native_samples = native_fed(native, script)
    program = make_program()
    segment, client, posted = drive_scripted(program, script, text_items)
    assert _flatten(segment.context) == expected
    for context in client.contexts:
        assert context == expected[: len(context)]
    for fed in client.server_fed:
        assert fed == expected[: len(fed)], "the server fed something the native engine would not have"
    assert client.server_fed and max(map(len, client.server_fed)) == len(expected)
    assert client.samples == native_samples
    tokens = [t for chunk, _ in posted for t in chunk]
    assert tokens == [t for t in native.decoded if t < EOS] if isinstance(native, BistreamProgram) else tokens
    assert posted[-1][1] is True
    return segment, client, native


def test_whole_text_refeeds_after_special_tokens_like_native():
    def make():
        return WholeTextProgram(list(range(10, 18)), [], [], EOS, RasConfig(), TokenRng(0))

    segment, client, native = _check_equivalent(make, whole_script)
    assert native.decoded == [t for t in native.decoded if t < EOS]
    assert segment.subrequests == 3  # restarted after each special token


def test_zero_shot_whole_text_with_prompt_speech_like_native():
    def make():
        return WholeTextProgram(list(range(10, 16)), [5, 6, 7], [40, 41, 42, 43], EOS, RasConfig(),
                                TokenRng(0))

    _check_equivalent(make, whole_script)


@pytest.mark.parametrize("prompt_speech", [[], list(range(500, 540))])
def test_bistream_fills_forced_fills_and_final_step_like_native(prompt_speech):
    text = [("text", list(range(1000, 1012))), ("text", list(range(1012, 1023))), ("end", None)]

    def make():
        return BistreamProgram([7, 8] if prompt_speech else [], prompt_speech, EOS, RasConfig(), TokenRng(0))

    segment, client, native = _check_equivalent(make, bistream_script, text)
    assert FILL in native.decoded
    assert segment.subrequests >= 3


# --- VllmEngine end to end with the stand-in -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_in_engine(tiny_model_dir):
    from cosyvoice_tts.vllm_backend.engine import VllmEngine
    from cosyvoice_tts.vllm_backend.testing import TorchLMClient

    clients = []

    def factory(engine):
        clients.append(TorchLMClient(tiny_model_dir))
        return clients[-1]

    engine = VllmEngine.load(tiny_model_dir, max_sessions=4, max_context=1024, client_factory=factory)
    engine.start()
    engine.test_client = clients[0]
    yield engine
    engine.shutdown()


TEXT = "Hello there, this is a short test of the streaming speech engine. And a second sentence follows here."


def test_stand_in_whole_text_same_seed_same_audio(stand_in_engine):
    engine = stand_in_engine
    first = engine.submit(SynthesisParams(voice="英文女", seed=7), text=TEXT)
    audio = first.audio()
    again = engine.submit(SynthesisParams(voice="英文女", seed=7), text=TEXT).audio()
    assert first.stats.outcome == "ok" and audio.size > 0
    np.testing.assert_array_equal(audio, again)
    # min/max length rule of the reference, per segment
    assert first.stats.speech_tokens >= 2 * first.stats.text_tokens


def test_stand_in_bistream(stand_in_engine):
    request = stand_in_engine.submit(SynthesisParams(voice="英文女", seed=9))
    for word in TEXT.split():
        request.push_text(word + " ")
        time.sleep(0.01)
    request.end_text()
    audio = request.audio()
    assert request.stats.outcome == "ok" and audio.size > 0


def test_stand_in_cancel_aborts_the_lm_request(stand_in_engine):
    engine, client = stand_in_engine, stand_in_engine.test_client
    request = engine.submit(SynthesisParams(voice="英文女", seed=5))  # bistream that never ends: LM keeps going
    request.push_text(TEXT * 3)
    deadline = time.monotonic() + 30
    while not client.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.active
    aborted_before = len(client.aborted)
    request.cancel()
    assert list(request) is not None and request.stats.outcome == "cancelled"
    deadline = time.monotonic() + 10
    while (client.active or engine.active_count()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.active == 0 and engine.active_count() == 0
    assert len(client.aborted) > aborted_before


def test_stand_in_stats_name_backend_and_sampling(stand_in_engine):
    stats = stand_in_engine.stats()
    assert stats["lm_backend_vllm"] == 1 and stats["lm_sampling_ras"] == 1
    assert stats["info"]["backend"] == "vllm" and stats["info"]["sampling"] == "ras"
    assert stats["vllm_subrequests"] > 0
