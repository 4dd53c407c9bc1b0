"""The padded prefill that the CUDA-graph path replays (model_runner.PaddedExtend), run eagerly on the CPU:
right-padding a prompt to a length bucket, or prefilling several requests in one padded batch, must not change
their log-probabilities or the cache they leave."""
import pytest
import torch

from cosyvoice_tts.engine import Engine
from cosyvoice_tts.engine.kv_cache import CacheFullError
from cosyvoice_tts.engine.lm_program import pieces_length
from cosyvoice_tts.engine.model_runner import PaddedExtend


def padded_prefill(runner, embeds, slot, start, length, key_len):
    # The graph's static buffers and forward, without the capture (CPU has no CUDA graphs).
    return PaddedExtend(runner, length, key_len).run([embeds[0]], [slot], [start])[0]


@torch.inference_mode()
def test_padded_prefill_equals_eager_prefill(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, max_sessions=2, max_context=512)
    runner = engine.runner
    a, b = runner.cache.allocate(), runner.cache.allocate()
    first = [("sos", []), ("text", list(range(50, 70))), ("task", [])]
    more = [("speech", [5, 9, 11])]
    eager = runner.extend(a, 0, first)
    eager_more = runner.extend(a, 22, more)

    padded = padded_prefill(runner, runner.embed(first).unsqueeze(0), b, 0, 32, 256)
    padded_more = padded_prefill(runner, runner.embed(more).unsqueeze(0), b, 22, 16, 256)
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_more, eager_more, atol=1e-5, rtol=0)
    # Real positions of the cache hold the same keys; padding wrote only past them (later overwritten).
    for k in runner.cache.k:
        torch.testing.assert_close(k[b, :25], k[a, :25], atol=1e-5, rtol=0)


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay re-runs the captured function into the same output."""

    def __init__(self, fn):
        self.fn = fn
        self.out = fn()

    def replay(self):
        self.out.copy_(self.fn())


@pytest.fixture
def eager_graphs(monkeypatch):
    """The runner's graph captures replaced by `_EagerGraph`: the graph path's buffers and padding, on the CPU."""
    from cosyvoice_tts.engine import model_runner

    def fake_capture(fn, device, pool, **_kwargs):
        graph = _EagerGraph(fn)
        return graph, graph.out

    monkeypatch.setattr(model_runner, "capture_graph", fake_capture)


@torch.inference_mode()
def test_graph_path_decode_with_padded_rows_equals_eager_decode(tiny_model_dir, eager_graphs):
    from cosyvoice_tts.engine.model_runner import DecodeRow, _CapturedDecode

    engine = Engine.load(tiny_model_dir, max_sessions=4, max_context=512)
    runner = engine.runner
    slots = [runner.cache.allocate() for _ in range(4)]
    prompt = [("sos", []), ("text", list(range(50, 70))), ("task", [])]
    for slot in slots:
        runner.extend(slot, 0, prompt)
    eager = runner.decode([DecodeRow(slots[0], 22, 7), DecodeRow(slots[1], 22, 9)])
    runner.graphs[(4, 256)] = _CapturedDecode(runner, 4, 256, None)  # 2 rows padded to 4
    graphed = runner.decode([DecodeRow(slots[2], 22, 7), DecodeRow(slots[3], 22, 9)])
    assert len(graphed) == 2
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got.logp, want.logp, atol=1e-5, rtol=0)
        assert (got.top_ids[:5] == want.top_ids[:5]).all()
    # The padded rows wrote only into the scratch slot.
    for k in runner.cache.k:
        torch.testing.assert_close(k[slots[2], :23], k[slots[0], :23], atol=1e-5, rtol=0)


PROMPTS = [[("sos", []), ("text", list(range(50, 70))), ("task", [])],
           [("sos", []), ("text", list(range(80, 85))), ("task", [])],
           [("sos", []), ("text", list(range(30, 61))), ("task", [])]]


@torch.inference_mode()
def test_batched_prefill_equals_one_request_at_a_time(tiny_model_dir):
    """Three prompts of different lengths (one at a later position, as bistream text is fed) in one padded
    forward: the log-probabilities and cache of one-by-one prefills."""
    engine = Engine.load(tiny_model_dir, max_sessions=6, max_context=512)
    runner = engine.runner
    alone, together = [runner.cache.allocate() for _ in range(3)], [runner.cache.allocate() for _ in range(3)]
    for slot_a, slot_b in zip(alone[2:], together[2:]):  # the third request already holds 22 inputs
        runner.extend(slot_a, 0, PROMPTS[0])
        runner.extend(slot_b, 0, PROMPTS[0])
    starts = [0, 0, 22]
    want = [runner.extend(slot, start, p) for slot, start, p in zip(alone, starts, PROMPTS)]
    got = runner.extend_batch(list(zip(together, starts, PROMPTS)))
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    for k in runner.cache.k:
        for slot_a, slot_b, start, prompt in zip(alone, together, starts, PROMPTS):
            end = start + pieces_length(prompt)
            torch.testing.assert_close(k[slot_b, :end], k[slot_a, :end], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_batched_prefill_graph_pads_rows_into_the_scratch_slot(tiny_model_dir, eager_graphs):
    from cosyvoice_tts.engine.model_runner import _CapturedExtend

    engine = Engine.load(tiny_model_dir, max_sessions=6, max_context=512)
    runner = engine.runner
    alone, together = [runner.cache.allocate() for _ in range(2)], [runner.cache.allocate() for _ in range(2)]
    want = [runner.extend(slot, 0, p) for slot, p in zip(alone, PROMPTS)]
    runner.use_cuda_graphs = True  # the graph path, with graphs that re-run eagerly
    runner.extend_graphs[(4, 32, 256)] = _CapturedExtend(runner, 32, 256, None, batch=4)
    got = runner.extend_batch([(slot, 0, p) for slot, p in zip(together, PROMPTS)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    # The two padded rows wrote only into the scratch slot: the free slots are untouched.
    free = [s for s in range(6) if s not in alone + together]
    for k in runner.cache.k:
        assert all(not k[s].any() for s in free)
        for slot_a, slot_b, n in zip(alone, together, (22, 7)):  # and every other slot keeps what it held
            torch.testing.assert_close(k[slot_b, :n], k[slot_a, :n], atol=1e-5, rtol=0)
    # No captured batch holds 40 inputs: one request at a time, the same answers.
    long = [("sos", []), ("text", list(range(100, 140))), ("task", [])]
    runner.use_cuda_graphs = False
    want_long = runner.extend(alone[0], 0, long)
    runner.use_cuda_graphs = True
    assert runner._extend_graph_for(2, 42, 0) is None
    got_long = runner.extend_batch([(together[0], 0, long), (together[1], 0, PROMPTS[1])])
    torch.testing.assert_close(got_long[0], want_long, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_batched_prefill_refuses_a_context_past_the_cache(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, max_sessions=2, max_context=256)
    runner = engine.runner
    slot = runner.cache.allocate()
    with pytest.raises(CacheFullError):
        runner.extend_batch([(slot, 250, PROMPTS[0]), (runner.cache.allocate(), 0, PROMPTS[1])])


@torch.inference_mode()
def test_a_queued_prefill_reads_back_after_a_decode_launched_behind_it(tiny_model_dir):
    """The engine queues a step's prefill, then its decode, and reads both back after: the prefill's log-probs
    are those of a prefill waited for alone, in item order also where the items go one forward each."""
    from cosyvoice_tts.engine.model_runner import DecodeRow

    engine = Engine.load(tiny_model_dir, max_sessions=8, max_context=512)
    runner = engine.runner
    alone = [runner.cache.allocate() for _ in range(3)]
    want = [runner.extend(slot, 0, p) for slot, p in zip(alone, PROMPTS)]
    running = runner.cache.allocate()
    runner.extend(running, 0, PROMPTS[0])
    for batch_prefill in (True, False):
        runner.batch_prefill = batch_prefill
        slots = [runner.cache.allocate() for _ in range(3)]
        pending = runner.launch_extend_batch([(slot, 0, p) for slot, p in zip(slots, PROMPTS)])
        runner.decode([DecodeRow(running, 22, 7)])
        got = pending.result()
        assert len(got) == 3
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        for slot in slots:
            runner.cache.release(slot)
