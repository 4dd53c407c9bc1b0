"""The padded prefill that the CUDA-graph path replays (model_runner._CapturedExtend), run eagerly on the CPU:
right-padding a prompt to a length bucket must not change its log-probabilities or the cache it leaves."""
import torch

from cosyvoice_tts.engine import Engine
from cosyvoice_tts.engine.model_runner import _CapturedExtend


def padded_prefill(runner, embeds, slot, start, length, key_len):
    # The graph's static buffers and forward, without the capture (CPU has no CUDA graphs).
    captured = object.__new__(_CapturedExtend)
    hidden = runner.llm.llm.config.hidden_size
    captured.length, captured.key_len = length, key_len
    captured.embeds = torch.zeros(1, length, hidden, dtype=runner.dtype)
    captured.slots = torch.zeros(1, dtype=torch.long)
    captured.positions = torch.zeros(1, length, dtype=torch.long)
    captured.last = torch.zeros(1, dtype=torch.long)
    n = embeds.shape[1]
    captured.embeds[:, :n] = embeds
    captured.slots.fill_(slot)
    torch.arange(start, start + length, out=captured.positions[0])
    captured.last.fill_(n - 1)
    return captured._forward(runner)[0]


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


@torch.inference_mode()
def test_graph_path_decode_with_padded_rows_equals_eager_decode(tiny_model_dir, monkeypatch):
    from cosyvoice_tts.engine import model_runner
    from cosyvoice_tts.engine.model_runner import DecodeRow, _CapturedDecode

    def fake_capture(fn, device, pool, **_kwargs):
        graph = _EagerGraph(fn)
        return graph, graph.out

    monkeypatch.setattr(model_runner, "capture_graph", fake_capture)
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
