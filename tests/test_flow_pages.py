"""The batched incremental flow (engine/flow_pages.py, modules/flow_paged.py): streams at different positions in
one call, each computing only its frames after its last boundary, equal to re-running its whole prefix."""
from __future__ import annotations

import pytest
import torch

from cosyvoice_tts.engine.flow_pages import PagedFlow, PagedRow
from test_flow import ATOL, pad_batch, request, run_single, tiny_flow

STEPS = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return tiny_flow()


def make_paged(flow, pages: int = 64, slots: int = 9, batch_sizes=(1, 2, 4), frame_sizes=(8, 16, 24, 32, 48, 64, 96),
               later: int = 32) -> PagedFlow:
    page = flow.token_mel_ratio * flow.incremental_unit
    paged = PagedFlow(flow.decoder, torch.device("cpu"), torch.float32, list(batch_sizes), list(frame_sizes),
                      max_later_frames=later, page_frames=page, steps=STEPS)
    paged.attach(paged.memory_for(flow.decoder.estimator, pages, slots))
    return paged


class Stream:
    """One request's chunk calls, as the engine makes them: prefixes of its tokens, the last one finalized."""

    def __init__(self, req: dict, prefixes: list[int], paged: PagedFlow, flow):
        self.req, self.prefixes, self.paged, self.flow = req, list(prefixes), paged, flow
        self.pages = paged.open_stream()
        self.prompt = req["prompt_token"].shape[1]

    def next_row(self) -> tuple[dict, bool, PagedRow]:
        count = self.prefixes.pop(0)
        finalize = not self.prefixes
        ratio, unit = self.flow.token_mel_ratio, self.flow.incremental_unit
        encoded = self.prompt + count - (0 if finalize else self.flow.pre_lookahead_len)
        start = self.pages.kept_frames
        commit = max(start, ratio * (encoded // unit * unit))
        assert self.paged.grow(self.pages, (commit - start) // (ratio * unit))
        return dict(self.req, token=self.req["token"][:, :count]), finalize, PagedRow(self.pages, start, commit,
                                                                                       ratio * encoded)


def run_round(flow, paged: PagedFlow, streams: list[Stream]):
    """One batched call for the next chunk of every stream; checks each against a re-run of its prefix."""
    calls = [stream.next_row() for stream in streams]
    batch = pad_batch([req for req, _, _ in calls])
    prepared = flow.prepare_batch(streaming=True, finalize=[f for _, f, _ in calls], **batch)
    mels = paged.sample(prepared, list(range(len(calls))), [row for _, _, row in calls])
    worst = 0.0
    for stream, (req, finalize, row), mel in zip(streams, calls, mels):
        rerun = run_single(flow, req, streaming=True, finalize=finalize)[0]  # frames after the prompt
        prompt_frames = req["prompt_feat"].shape[1]
        assert mel.shape == (80, row.end - row.start)
        skip = max(0, prompt_frames - row.start)
        expected = rerun[:, row.start + skip - prompt_frames:]
        torch.testing.assert_close(mel[:, skip:], expected, rtol=0, atol=ATOL)
        worst = max(worst, float((mel[:, skip:] - expected).abs().max()))
        row.pages.kept_frames = row.commit
        if finalize:
            paged.release(row.pages)
    return worst


@pytest.fixture(scope="module")
def fused_flow():
    """The engine's form: q/k/v as one GEMM (keys and values then share a buffer), convolutions as GEMMs."""
    torch.manual_seed(0)
    flow = tiny_flow()
    flow.decoder.estimator.fuse_projections()
    return flow


@pytest.mark.parametrize("form", ["modules", "fused"])
def test_streams_at_different_positions_share_a_call_and_equal_the_rerun(flow, fused_flow, form):
    flow = fused_flow if form == "fused" else flow
    paged = make_paged(flow)
    gen = torch.Generator().manual_seed(11)
    # Prompts of 0, 5 and 3 tokens; the hops differ, so each call mixes first, middle and last chunks.
    streams = [Stream(request(gen, 0, 40), [7, 11, 19, 27, 40], paged, flow),
               Stream(request(gen, 5, 30), [10, 14, 22, 26, 30], paged, flow),
               Stream(request(gen, 3, 33), [8, 9, 20, 31, 33], paged, flow)]
    for _ in range(5):
        run_round(flow, paged, streams)
    assert paged.calls["eager"] == 5
    paged.apply_releases()
    assert paged.free_pages == paged.memory.pages - 1  # every page back once the streams are done


def test_streams_opened_on_used_slots_start_from_zero_history(flow):
    """Slots come back dirty from a finished stream; streams opened on them (two at once, zeroed together at
    their first call) still equal their re-run."""
    paged = make_paged(flow, slots=5)  # room for two streams: the second pair must reuse the first pair's slots
    gen = torch.Generator().manual_seed(13)
    first = [Stream(request(gen, 2, 20), [9, 20], paged, flow), Stream(request(gen, 0, 20), [7, 20], paged, flow)]
    for _ in range(2):
        run_round(flow, paged, first)
    paged.apply_releases()
    second = [Stream(request(gen, 0, 24), [8, 17, 24], paged, flow),
              Stream(request(gen, 3, 24), [10, 24], paged, flow)]
    assert {s for stream in second for s in stream.pages.slots} == {s for stream in first for s in stream.pages.slots}
    run_round(flow, paged, second)
    run_round(flow, paged, second[:1])


def test_a_stream_gives_the_same_mel_alone_and_among_others(flow):
    gen = torch.Generator().manual_seed(12)
    req = request(gen, 4, 30)
    others = [request(gen, p, 30) for p in (0, 6, 2)]
    alone_paged = make_paged(flow)
    alone = Stream(req, [12, 16, 24, 30], alone_paged, flow)
    shared_paged = make_paged(flow, pages=128)
    mixed = [Stream(req, [12, 16, 24, 30], shared_paged, flow)] + \
        [Stream(r, [9, 13, 21, 30], shared_paged, flow) for r in others]
    for _ in range(4):
        row_alone = alone.next_row()
        prepared = flow.prepare_batch(streaming=True, finalize=row_alone[1], **pad_batch([row_alone[0]]))
        (mel_alone,) = alone_paged.sample(prepared, [0], [row_alone[2]])
        row_alone[2].pages.kept_frames = row_alone[2].commit
        calls = [stream.next_row() for stream in mixed]
        prepared = flow.prepare_batch(streaming=True, finalize=[f for _, f, _ in calls],
                                      **pad_batch([r for r, _, _ in calls]))
        mel_mixed = shared_paged.sample(prepared, list(range(len(calls))), [row for _, _, row in calls])[0]
        for _, _, row in calls:
            row.pages.kept_frames = row.commit
        torch.testing.assert_close(mel_mixed, mel_alone, rtol=0, atol=ATOL)  # padding changes GEMM shapes


def test_pool_accounting_and_deferred_release(flow):
    paged = make_paged(flow, pages=5, slots=5)  # 4 pages and 4 slots besides the scratch ones
    first, second = paged.open_stream(), paged.open_stream()
    assert first.slots != second.slots and paged.open_stream() is None  # two slots per stream
    assert paged.grow(first, 2) and paged.free_pages == 0
    assert not paged.grow(second, 1)  # nothing taken when the pool cannot give both branches a page
    assert second.pages == ([], [])
    paged.release(first)
    paged.release(first)  # twice is once
    assert paged.free_pages == 0  # applied on the vocoder thread's next call, not by the releasing thread
    paged.apply_releases()
    assert paged.free_pages == 4 and first.pages == ([], [])
    assert paged.open_stream() is not None


def test_buckets_keep_wide_windows_for_first_chunks(flow):
    paged = make_paged(flow)
    assert paged.bucket(3, 20, 2) == (4, 24, 2)
    assert paged.bucket(1, 60, 0) == (1, 64, 0)  # a first chunk (prompt included) may be wide
    assert paged.bucket(1, 60, 1) is None  # a later chunk never is: such a call runs unpadded, eagerly
    assert paged.bucket(5, 8, 0) is None
    shapes = paged.shapes_within(64)
    assert (4, 16, 3) in shapes and (4, 24, 0) not in shapes and (1, 96, 0) in shapes and (1, 48, 1) not in shapes
    capped = paged.shapes_within(64, max_past_pages=2)  # longer pasts are left to run eagerly
    assert capped == [s for s in shapes if s[2] <= 2] and (4, 16, 3) not in capped and (4, 16, 2) in capped


def test_engine_streams_through_the_paged_flow_and_matches_the_rerun(tiny_model_dir):
    """Whole requests through the engine: the paged flow gives the audio of the re-run within float tolerance,
    and every page comes back when the requests end, cancelled ones included."""
    import numpy as np

    from cosyvoice_tts.engine import Engine
    from cosyvoice_tts.engine.request import SynthesisParams

    text = "今天天气真不错，我们一起去公园散步吧，顺便买点水果回来。"
    audio = {}
    for name, gib in (("paged", None), ("rerun", 0)):
        engine = Engine.load(tiny_model_dir, max_sessions=4, flow_memory_gib=gib, paged_from_frames=0)
        engine.start()
        try:
            assert (engine.paged_flow is None) == (gib == 0)
            request = engine.submit(SynthesisParams(voice="中文女", seed=3), text=text)
            audio[name] = request.audio()
            if engine.paged_flow is not None:
                stats = engine.stats()
                assert stats["flow_paged_eager_calls"] >= 2 and stats["flow_paged_fallbacks"] == 0
                cancelled = engine.submit(SynthesisParams(voice="中文女", seed=4), text=text * 3)
                next(iter(cancelled))
                cancelled.cancel()
                cancelled.audio()
                engine.submit(SynthesisParams(voice="中文女", seed=5), text="好。").audio()  # applies the releases
                assert engine.stats()["flow_memory_pages_free"] == engine.paged_flow.memory.pages - 1
        finally:
            engine.shutdown()
    assert audio["paged"].shape == audio["rerun"].shape
    np.testing.assert_allclose(audio["paged"], audio["rerun"], atol=1e-4)


@pytest.mark.parametrize("from_frames, batched, kept", [
    # Hops of 25, 50, 100 tokens, then the rest: prefixes of 50 and 150 frames re-run (<= 160), then the memory
    # starts at frame 0 and keeps everything before the last chunk boundary.
    (160, True, [None, None, 350, 400]),
    # 0: a first chunk batched with another keeps its memory already...
    (0, True, [50, 150, 350, 400]),
    # ...and one vocoded alone re-runs (the GPU is idle and its listener waits); the next chunk starts the memory.
    (0, False, [None, 150, 350, 400]),
])
def test_a_stream_re_runs_until_its_prefix_is_long_then_keeps_memory(tiny_model_dir, from_frames, batched, kept):
    """Every chunk re-runs while the prefix is at most paged_from_frames, and a first chunk vocoded alone; from
    then on the stream keeps its memory, and gives it back with its last chunk."""
    from cosyvoice_tts.engine import Engine
    from cosyvoice_tts.engine.flow_pages import StreamPages
    from cosyvoice_tts.engine.token2wav import StreamState
    from cosyvoice_tts.engine.voices import voice_prompt

    engine = Engine.load(tiny_model_dir, max_sessions=4, paged_from_frames=from_frames)  # pages for both streams
    engine.start()
    try:
        prompt = voice_prompt("sft", engine._voice("中文女"), engine._tokenize, None)

        def stream() -> StreamState:
            state = StreamState(prompt.flow_prompt_speech, prompt.prompt_feat, prompt.embedding, stream=True,
                                speed=1.0, cfg=engine.stream_config)
            state.tokens = list(range(100, 300))
            state.lm_done = True
            return state

        state, companion = stream(), stream()
        seen = []  # (frames of the prefix, memory kept after the chunk)
        while (chunk := state.next_chunk()) is not None:
            items = [(state, chunk, torch.Generator().manual_seed(0))]
            if batched:
                items.append((companion, companion.next_chunk(), torch.Generator().manual_seed(1)))
            engine.token2wav.run_batch(items)
            memory = state.flow_memory
            seen.append((2 * (len(chunk.tokens) - (0 if chunk.finalize else 3)),
                         memory.kept_frames if isinstance(memory, StreamPages) else None))
        assert seen == list(zip([50, 150, 350, 400], kept))
        assert isinstance(state.flow_memory, StreamPages) and state.flow_memory.released
        engine.paged_flow.apply_releases()
        assert engine.paged_flow.free_pages == engine.paged_flow.memory.pages - 1
    finally:
        engine.shutdown()
