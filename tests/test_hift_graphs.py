"""The graphed HiFT wrapper's padding, noise and cache handling, with the replay run eagerly on the CPU (the
capture itself needs CUDA; bench_engine compares graphed and eager HiFT on a GPU)."""
import pytest
import torch

from cosyvoice_tts.engine.hift_graphs import GraphedHiFT, _CapturedHiFT
from cosyvoice_tts.engine.loader import build_modules


class EagerReplay(_CapturedHiFT):
    def __init__(self, hift, batch, frames, cache_len, shared, pool):
        self._bind(hift, batch, frames, cache_len, shared)

    def replay(self):
        self.speech, self.source = self._run()


@pytest.fixture(scope="module")
def hift(tiny_model_dir):
    return build_modules(tiny_model_dir).hift.eval()


def generators(seed, count):
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


@torch.inference_mode()
def test_padded_replay_equals_the_eager_batch(hift):
    spf = hift.samples_per_frame
    cache_len = 8 * spf
    graphed = GraphedHiFT(hift, [1, 2, 4], cache_len, max_frame_rows=512, frame_buckets=(32, 64, 128))
    graphed.capture_all(captured=EagerReplay)
    torch.manual_seed(0)
    mels = [torch.randn(1, 80, n) for n in (50, 21, 58)]
    caches = [None, torch.randn(1, 1, cache_len), torch.randn(1, 1, cache_len // 2)]
    got = graphed.inference_batch(mels, caches, generators(7, 3))
    want = hift.inference_batch(mels, caches, generators(7, 3))
    assert graphed.calls == {"graphed": 1, "eager": 0}
    for (speech, source), (speech_ref, source_ref) in zip(got, want):
        assert speech.shape == speech_ref.shape and source.shape == source_ref.shape
        torch.testing.assert_close(speech, speech_ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(source, source_ref, atol=2e-5, rtol=0)
    # Outputs are copies: the next replay must not change what a caller kept.
    kept = got[0][1].clone()
    graphed.inference_batch([torch.randn(1, 80, 40)], None, generators(1, 1))
    torch.testing.assert_close(got[0][1], kept, atol=0, rtol=0)


@torch.inference_mode()
def test_outside_the_buckets_runs_eagerly(hift):
    graphed = GraphedHiFT(hift, [1, 2], 8 * hift.samples_per_frame, max_frame_rows=128, frame_buckets=(32, 64))
    graphed.capture_all(captured=EagerReplay)
    assert (2, 64) in graphed.graphs and (2, 128) not in graphed.graphs
    graphed.inference_batch([torch.randn(1, 80, 100)], None, generators(0, 1))  # longer than every bucket
    graphed.inference_batch([torch.randn(1, 80, 10)], None, [None])  # global-RNG noise: eager's draw order
    assert graphed.calls == {"graphed": 0, "eager": 2}
