"""How ready chunks are grouped into vocoder batches, and which flow shapes get CUDA graphs."""
from types import SimpleNamespace

import pytest

from cosyvoice_tts.engine.flow_graphs import frame_buckets
from cosyvoice_tts.engine.scheduler import pick_vocoder_batch


def ready(first: bool):
    return SimpleNamespace(stats=SimpleNamespace(first_chunk_at=None if first else 1.0))


def ladder_shape(n, frames):
    sizes = [b for b in (1, 2, 4, 8, 16) if b >= n]
    return sizes[0], -(-frames // 50) * 50


def test_first_chunk_is_not_padded_to_long_prefixes():
    head, long_a, short, long_b = ready(True), ready(False), ready(False), ready(False)
    batch = pick_vocoder_batch([head, long_a, short, long_b], [56, 600, 90, 800], 8192, ladder_shape)
    assert batch == [head, short]


def test_later_chunks_fill_the_budget_in_priority_order():
    items = [ready(False) for _ in range(6)]
    # 4 rows x 500 frames = 2000 fits; a fifth row pads the batch to 8 x 500 = 4000 > 3000.
    batch = pick_vocoder_batch(items, [500, 450, 400, 480, 300, 100], 3000, ladder_shape)
    assert batch == items[:4]


def test_a_head_over_budget_still_runs_alone():
    head, other = ready(False), ready(False)
    assert pick_vocoder_batch([head, other], [2000, 50], 1000, ladder_shape) == [head]


def test_smaller_chunks_join_after_a_rejected_one():
    a, b, c = ready(False), ready(False), ready(False)
    # a + b = 2 x 1000 > 1500; a + c = 2 x 500 fits.
    assert pick_vocoder_batch([a, b, c], [400, 1000, 100], 1500, ladder_shape) == [a, c]


@pytest.mark.parametrize("unit,max_frames", [(50, 1000), (50, 300), (50, 260), (25, 2000)])
def test_frame_buckets_cover_every_length_with_bounded_padding(unit, max_frames):
    buckets = frame_buckets(unit, max_frames)
    assert buckets == sorted(set(buckets)) and all(b % unit == 0 for b in buckets)
    assert buckets[:6] == [unit * n for n in range(1, 7)] or buckets[-1] <= 6 * unit
    assert buckets[-1] == -(-max_frames // unit) * unit
    for frames in range(1, max_frames + 1):
        padded = min(b for b in buckets if b >= frames)
        # Past six chunks a length is padded by at most a third (ladder steps of about a quarter).
        assert padded - frames < unit or padded <= frames * 4 / 3 + unit


def started(ahead_s: float, now: float = 100.0):
    # Playing for 10 s from first_chunk_at, with `ahead_s` more audio than that delivered.
    return SimpleNamespace(sample_rate=100, stats=SimpleNamespace(first_chunk_at=now - 10.0,
                                                                 audio_samples=int((10.0 + ahead_s) * 100)))


def test_a_stream_about_to_run_dry_outranks_first_chunks_which_outrank_safe_streams():
    from cosyvoice_tts.engine.scheduler import chunk_priority

    dry, new, safe, safer = started(0.2), ready(True), started(3.0), started(6.0)
    order = sorted([safer, new, safe, dry], key=lambda r: chunk_priority(r, 100.0))
    assert order == [dry, new, safe, safer]


def test_stream_caches_are_copies_not_views_of_the_flow_output(tiny_model_dir):
    """The flow's output can be a CUDA graph's buffer that the next replay rewrites (another request's mel)."""
    import torch

    from cosyvoice_tts.engine.loader import build_modules
    from cosyvoice_tts.engine.token2wav import StreamConfig, StreamState, Token2Wav

    from cosyvoice_tts.engine.modules.flow import FlowBatch

    class FlowWritingOneBuffer:
        """The flow as Token2Wav calls it, with a sampler whose output is one buffer that every call rewrites."""

        def __init__(self):
            self.buffer = torch.zeros(1, 80, 400)

        def prepare_batch(self, token_len, **_):
            batch = token_len.shape[0]
            features = torch.zeros(batch, 80, 400)
            return FlowBatch(features, torch.ones(batch, 1, 400), features, torch.zeros(batch, 80),
                             torch.full((batch,), 400), torch.zeros(batch, dtype=torch.long),
                             torch.ones(batch, dtype=torch.bool))

        def decoder(self, mu, **_):
            self.buffer.normal_()
            return self.buffer[: mu.shape[0]], None

    cfg = StreamConfig()
    flow = FlowWritingOneBuffer()
    token2wav = Token2Wav(flow, build_modules(tiny_model_dir).hift, torch.device("cpu"), cfg)
    state = StreamState(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 80), torch.zeros(1, 192),
                        stream=True, speed=1.0, cfg=cfg)
    state.tokens = list(range(28))
    token2wav.run_batch([(state, state.next_chunk(), torch.Generator().manual_seed(0))])
    kept = [state.hift_mel.clone(), state.hift_source.clone(), state.hift_speech.clone()]
    flow.buffer.normal_()  # the next replay
    for before, now in zip(kept, (state.hift_mel, state.hift_source, state.hift_speech)):
        assert torch.equal(before, now)


def waiting(can: bool):
    return SimpleNamespace(stats=SimpleNamespace(first_chunk_at=1.0), can=can)


def test_a_batch_is_cut_to_a_graph_size_when_what_is_cut_can_wait():
    items = [waiting(True) for _ in range(6)]
    # 6 rows would run padded to 8: the two least urgent wait for the next batch instead.
    batch = pick_vocoder_batch(items, [100] * 6, 8192, ladder_shape, lambda r: r.can)
    assert batch == items[:4]


def test_a_batch_is_padded_rather_than_cut_when_a_cut_chunk_is_urgent():
    items = [waiting(True) for _ in range(4)] + [waiting(False)]
    assert pick_vocoder_batch(items, [100] * 5, 8192, ladder_shape, lambda r: r.can) == items
    # without the policy, as before: everything that fits the budget, padded
    three = [waiting(True) for _ in range(3)]
    assert pick_vocoder_batch(three, [100] * 3, 8192, ladder_shape) == three


def test_can_wait_means_started_with_audio_to_spare():
    from cosyvoice_tts.engine.scheduler import STALL_GUARD_S, can_wait

    assert can_wait(started(STALL_GUARD_S + 0.1), 100.0)
    assert not can_wait(started(STALL_GUARD_S - 0.1), 100.0)
    assert not can_wait(ready(True), 100.0)


def stream_request(*, first_chunk_at=None, ahead_s=0.0, chunk_ready=True, vocoded_first=True):
    """A request as Scheduler.plan sees it: no LM input pending, a stream with or without a chunk ready."""
    import time

    now = time.monotonic()
    stats = SimpleNamespace(first_chunk_at=None, audio_samples=0,
                            first_vocode_at=now - 1.0 if vocoded_first else None)
    if first_chunk_at is not None:
        stats.first_chunk_at = now - first_chunk_at
        stats.audio_samples = int((first_chunk_at + ahead_s) * 100)
    return SimpleNamespace(program=None, vocoding=False, sample_rate=100, stats=stats,
                           stream=SimpleNamespace(has_chunk=lambda: chunk_ready))


def test_chunks_with_audio_to_spare_wait_while_a_request_produces_its_first_chunk():
    from cosyvoice_tts.engine.scheduler import Scheduler, SchedulerConfig

    comfortable = stream_request(first_chunk_at=5.0, ahead_s=3.0)
    new = stream_request(chunk_ready=False, vocoded_first=False)
    scheduler = Scheduler()
    assert scheduler.plan([comfortable, new]).chunks == []
    # nobody is producing a first chunk: the vocoder may take it
    assert scheduler.plan([comfortable]).chunks == [comfortable]
    # a stream running low starts the batch, and the comfortable one rides along
    low = stream_request(first_chunk_at=5.0, ahead_s=0.3)
    assert scheduler.plan([comfortable, new, low]).chunks == [low, comfortable]
    # a ready first chunk starts it too
    first = stream_request(vocoded_first=False)
    assert scheduler.plan([comfortable, new, first]).chunks == [first, comfortable]
    # the policy off
    assert Scheduler(SchedulerConfig(hold_ahead_s=None)).plan([comfortable, new]).chunks == [comfortable]


def test_a_first_chunks_batch_leaves_chunks_that_can_wait_for_the_next():
    head, other_first = ready(True), ready(True)
    head.can = other_first.can = False
    low, spare = waiting(False), waiting(True)
    items = [low, head, other_first, spare]  # priority order: a stream running dry may head the batch
    may = lambda r: r.can  # noqa: E731
    assert pick_vocoder_batch([head, low, other_first, spare], [56] * 4, 8192, ladder_shape,
                              may_leave=may) == [head, low, other_first]
    # headed by a later chunk, the batch is not a first chunk's: everything that fits goes
    assert pick_vocoder_batch(items, [56] * 4, 8192, ladder_shape, may_leave=may) == items
    # without the policy, the spare chunk rides along
    assert pick_vocoder_batch([head, low, other_first, spare], [56] * 4, 8192, ladder_shape) == \
        [head, low, other_first, spare]
