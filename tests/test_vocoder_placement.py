"""The vocoder's two placements (engine/vocoder_worker.py): its own thread, or launched from the LM loop with the
audio collected later. Same requests, same seeds: the same tokens and audio either way; a failing batch fails
only its own requests."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from concurrent_audio import audio_of_all
from cosyvoice_tts.engine import Engine, EngineError, SynthesisParams
from cosyvoice_tts.engine.token2wav import FlowLaunched, VocodedBatch
from cosyvoice_tts.engine.vocoder_worker import VOCODER_MODES, OverlappedVocoder, VocoderWorker, make_vocoder
from cosyvoice_tts.server.config import VOCODER_MODES as WORKER_VOCODER_MODES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Sentence number one, a little longer than the rest of them.", "第二句话。", "Three.",
         "第四句话，也长一点，让它多出几个分块。"]


def synthesize_together(engine: Engine) -> dict[int, tuple[np.ndarray, dict]]:
    requests = [engine.submit(SynthesisParams(voice="中文女" if i % 2 else "英文女", seed=40 + i), text=text)
                for i, text in enumerate(TEXTS)]
    return audio_of_all(requests)


WORKERS = {"thread": VocoderWorker, "overlap": OverlappedVocoder}


def test_every_placement_gives_the_same_tokens_and_audio(engine):
    assert set(WORKERS) == set(VOCODER_MODES) == set(WORKER_VOCODER_MODES)
    by_mode = {}
    for mode in ("thread", "overlap", "thread"):
        engine.set_vocoder_mode(mode)
        assert isinstance(engine.vocoder, WORKERS[mode]) and engine.vocoder_mode == mode
        by_mode.setdefault(mode, synthesize_together(engine))
    for mode in ("overlap",):
        for i in range(len(TEXTS)):
            (thread_audio, thread_summary), (audio, summary) = by_mode["thread"][i], by_mode[mode][i]
            assert thread_summary["outcome"] == summary["outcome"] == "ok"
            assert thread_summary["speech_tokens"] == summary["speech_tokens"]
            assert thread_audio.shape == audio.shape and thread_audio.size > 0
            # Batches may group chunks differently; batched flow and HiFT agree within float rounding.
            np.testing.assert_allclose(audio, thread_audio, atol=1e-4)


def test_overlap_engine_streams_and_cancels(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, max_sessions=2, vocoder_mode="overlap")
    engine.start()
    try:
        assert engine.vocoder_mode == "overlap"
        request = engine.submit(SynthesisParams(voice="中文女", seed=5), text="第一句话。第二句话，长一些。")
        chunks = list(request)
        assert len(chunks) > 1 and request.summary["outcome"] == "ok"
        long = engine.submit(SynthesisParams(voice="中文女", seed=6), text="这是一句很长的话。" * 6)
        next(iter(long))
        long.cancel()
        assert long.audio().size >= 0 and long.stats.outcome == "cancelled"
        assert engine.submit(SynthesisParams(voice="中文女", seed=7), text="再来一句。").audio().size > 0
    finally:
        engine.shutdown()


def test_placement_switch_needs_an_idle_engine_and_a_known_mode(engine):
    with pytest.raises(ValueError, match="overlap"):
        engine.set_vocoder_mode("process")
    request = engine.submit(SynthesisParams(voice="中文女", seed=1), text="这是一句很长的话，" * 8)
    try:
        with pytest.raises(EngineError, match="idle"):
            engine.set_vocoder_mode("overlap" if engine.vocoder_mode == "thread" else "thread")
    finally:
        request.cancel()
        request.audio()
    with pytest.raises(ValueError, match="vocoder_mode"):
        Engine(None, None, torch.device("cpu"), torch.float32, 1, 16, vocoder_mode="inline")


class _Broken:
    """A Token2Wav whose launch fails, as a bad kernel would."""

    def launch_batch(self, items):
        raise RuntimeError("kernel failed")

    def launch_flow(self, items, launcher=None):
        raise RuntimeError("kernel failed")


@pytest.mark.parametrize("mode", VOCODER_MODES)
def test_a_failed_batch_fails_its_requests_and_the_vocoder_lives_on(mode):
    woken = threading.Event()
    worker = make_vocoder(mode, _Broken(), torch.device("cpu"), woken.set)
    try:
        worker.submit([("request", "state", "chunk", None)])
        assert woken.wait(10)
        results = []
        for _ in range(100):
            results += worker.take_results()
            if results:
                break
            woken.clear()
            woken.wait(0.1)
        (request, state, audio, error), = results
        assert (request, state, audio) == ("request", "state", None) and "kernel failed" in str(error)
        assert worker.idle
    finally:
        worker.stop()



class _SlowFlow(FlowLaunched):
    """A flow stage the test finishes by hand (`done`), then a HiFT stage with two items' audio."""

    def __init__(self):
        self.event, self.done, self.vocoder_launches = None, False, 0

    def ready(self) -> bool:
        return self.done

    def wait(self) -> None:
        while not self.done:
            time.sleep(0.001)

    def launch_vocoder(self) -> VocodedBatch:
        self.vocoder_launches += 1
        return VocodedBatch(torch.arange(5, dtype=torch.float32), [2, 3])


def test_overlap_launches_hift_once_the_flow_is_done():
    flow, woken = _SlowFlow(), threading.Event()
    token2wav = SimpleNamespace(launch_flow=lambda items, launcher=None: flow)
    worker = OverlappedVocoder(token2wav, torch.device("cpu"), woken.set)
    try:
        worker.submit([("a", "state a", "chunk", None), ("b", "state b", "chunk", None)])
        assert not worker.idle and not worker.stage_due
        worker.advance()
        assert flow.vocoder_launches == 0 and worker.take_results() == []
        flow.done = True
        assert woken.wait(10)  # the watcher saw the flow finish
        assert worker.stage_due
        worker.advance()
        assert flow.vocoder_launches == 1 and not worker.stage_due
        (a, _, audio_a, error_a), (b, _, audio_b, _) = worker.take_results()
        assert (a, b, error_a) == ("a", "b", None)
        assert audio_a.tolist() == [0, 1] and audio_b.tolist() == [2, 3, 4]
        assert worker.idle and worker.take_results() == []
    finally:
        worker.stop()


class _Graph:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def replay(self):
        self.log.append(self.name)


def test_replays_in_a_deferred_block_are_collected_in_order_and_not_launched():
    from cosyvoice_tts.engine.cuda_graphs import deferred_replays, replay

    log = []
    replay(_Graph("now", log))
    with deferred_replays() as pending:
        replay(_Graph("a", log))
        replay(_Graph("b", log))
        with pytest.raises(RuntimeError, match="already"):
            with deferred_replays():
                pass
    assert log == ["now"] and len(pending) == 2
    for launch in pending:
        launch()
    assert log == ["now", "a", "b"]
    replay(_Graph("after", log))  # collection ended with the block
    assert log[-1] == "after"


def test_the_replay_launcher_launches_in_order_then_marks_the_flow_done():
    from cosyvoice_tts.engine.token2wav import FlowLaunched
    from cosyvoice_tts.engine.vocoder_worker import ReplayLauncher

    token2wav = SimpleNamespace(device=torch.device("cpu"), _launch_vocoder=lambda items, mels: ("hift", items))
    gate, log = threading.Event(), []
    launcher = ReplayLauncher(torch.device("cpu"), None)
    try:
        flow = FlowLaunched(token2wav, ["item"], [], record=False)
        launcher.submit([lambda: gate.wait(10), lambda: log.append(1), lambda: log.append(2)], flow)
        assert not flow.ready()  # its replays are not launched yet: HiFT must not be queued before them
        gate.set()
        flow.wait()
        assert flow.ready() and log == [1, 2] and flow.launch_vocoder() == ("hift", ["item"])

        broken = FlowLaunched(token2wav, ["item"], [], record=False)
        launcher.submit([lambda: 1 / 0, lambda: log.append(3)], broken)
        broken.wait()
        assert broken.ready() and log == [1, 2]  # the batch stops at the failed replay
        with pytest.raises(ZeroDivisionError):
            broken.launch_vocoder()
        later = FlowLaunched(token2wav, [], [], record=False)
        launcher.submit([lambda: log.append(4)], later)
        later.wait()
        assert log == [1, 2, 4] and launcher.busy_s > 0
    finally:
        launcher.stop()
