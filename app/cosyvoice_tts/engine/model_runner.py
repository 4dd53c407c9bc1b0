"""Owns the device side of the speech-token LM: weights, KV cache, and the captured decode step.

Two kinds of LM work: `extend` feeds a request several inputs (prompt prefill, bistream text, re-fed inputs), and
`extend_batch` several requests at once; `decode` feeds many requests one speech token each in a single forward.
Both come in two halves as well, queued on the device (`launch_extend_batch`, `launch_decode`) and waited for,
so that the engine can queue a step's prefill and decode together and do its host work while the GPU runs them.
On CUDA both are captured as CUDA graphs for ladders of shapes (eager decoding is launch-bound: ~64 ms vs ~3 ms a
step on an H100 for this model), with padded rows writing into a scratch slot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .cuda_graphs import capture_graph
from .host_copy import copy_into, to_device, to_host
from .kv_cache import CacheFullError, KVCache
from .lm_program import Piece, pieces_length
from .modules.llm import Qwen2LM
from .modules.qwen2 import AttentionInputs
from .sampling import StepDistribution

# Candidates copied back per row; RAS keeps at most top_k (25) of them.
TOP_CANDIDATES = 32
# Requests arriving together are prefilled together (a closed-loop bench at 32 streams sees ~4 at once), up to
# this many in one captured forward, of at most this many inputs each (a 20-word sentence's prompt is ~50)
PREFILL_BATCHES = (2, 4, 8)
MAX_BATCHED_PREFILL = 128

log = logging.getLogger(__name__)


@dataclass
class DecodeRow:
    slot: int
    position: int
    token: int


class PendingLogprobs:
    """Log-probs (CPU fp32, one row per request) whose copy from the device is queued; `result` waits for it."""

    def __init__(self, rows: list[torch.Tensor], copied: "torch.cuda.Event | None"):
        self._rows = rows
        self._copied = copied

    def result(self) -> list[torch.Tensor]:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._rows


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 32 else 16))
    return [s for s in sizes if s < max_batch] + [max_batch]


class _CapturedDecode:
    """One CUDA graph of the decode step for a fixed batch size: the forward and the candidates' top-k, packed
    into one output buffer, so a step is one input copy, one replay and one output copy."""

    def __init__(self, runner: "ModelRunner", batch: int, key_len: int, pool):
        device = runner.device
        self.batch = batch
        self.key_len = key_len
        # Rows: tokens, slots, positions; padded rows write into the scratch slot at position 0.
        self.inputs = torch.zeros(3, batch, dtype=torch.long, device=device)
        self.inputs[1].fill_(runner.cache.scratch_slot)
        self.graph, self.out = capture_graph(
            lambda: runner._decode_step(self.inputs[0], self.inputs[1], self.inputs[2].unsqueeze(1), key_len),
            device, pool, warmups=2, error_mode="global")

    def run(self, host: torch.Tensor) -> torch.Tensor:
        """host [3, batch] (CPU, padded as above) -> the packed rows [batch, V + 2K] on the device."""
        self.inputs.copy_(host, non_blocking=True)
        self.graph.replay()
        return self.out


class PaddedExtend:
    """A prefill of up to `batch` requests, each up to `length` inputs, attending over `key_len` positions, in one
    padded forward: requests that arrive together are prefilled together instead of one after another, each of
    which every running stream's next step would wait for. Run eagerly as it is; captured by `_CapturedExtend`.

    Inputs are right-padded with zero embeddings. The padded inputs sit after every real one, so causal
    attention keeps them out of the real outputs; they write keys and values into the request's own slot past
    its last real position, which the next real input there overwrites before anything reads it. Rows beyond the
    call's requests write into the scratch slot."""

    def __init__(self, runner: "ModelRunner", length: int, key_len: int, batch: int = 1):
        device = runner.device
        self.runner = runner
        self.batch = batch
        self.length = length
        self.key_len = key_len
        self.embeds = torch.zeros(batch, length, runner.llm.llm.config.hidden_size, dtype=runner.dtype,
                                  device=device)
        # Rows: slot, first position, index of the last real input in the flattened [batch * length] outputs.
        self.rows = torch.zeros(3, batch, dtype=torch.long, device=device)
        self.rows[0].fill_(runner.cache.scratch_slot)
        self.steps = torch.arange(length, device=device)

    def _forward(self) -> torch.Tensor:
        runner = self.runner
        slots, starts, last = self.rows.unbind(0)
        positions = starts[:, None] + self.steps[None, :]
        attn = AttentionInputs.build(slots, positions, self.key_len, runner.dtype)
        hidden = runner.llm.llm(self.embeds, runner.cache.k, runner.cache.v, attn)
        return runner.llm.logprobs(hidden.flatten(0, 1).index_select(0, last))

    def _fill(self, embeds: list[torch.Tensor], slots: list[int], starts: list[int]) -> None:
        pad = self.batch - len(embeds)
        self.embeds.zero_()
        for row, e in enumerate(embeds):
            self.embeds[row, :e.shape[0]].copy_(e)
        host = torch.tensor([list(slots) + [self.runner.cache.scratch_slot] * pad, list(starts) + [0] * pad,
                             [row * self.length + e.shape[0] - 1 for row, e in enumerate(embeds)] + [0] * pad],
                            dtype=torch.long)
        copy_into(self.rows, host)

    def run(self, embeds: list[torch.Tensor], slots: list[int], starts: list[int]) -> torch.Tensor:
        """embeds[i] [n_i, hidden] for slot slots[i] from position starts[i] -> log-probs [batch, vocab] (the
        first len(embeds) rows are the requests')."""
        self._fill(embeds, slots, starts)
        return self._forward()


class _CapturedExtend(PaddedExtend):
    """`PaddedExtend` as one CUDA graph."""

    def __init__(self, runner: "ModelRunner", length: int, key_len: int, pool, batch: int = 1):
        super().__init__(runner, length, key_len, batch)
        self.graph, self.logp = capture_graph(self._forward, runner.device, pool, warmups=2, error_mode="global")

    def run(self, embeds: list[torch.Tensor], slots: list[int], starts: list[int]) -> torch.Tensor:
        self._fill(embeds, slots, starts)
        self.graph.replay()
        return self.logp


def _extent(items: list[tuple[int, int, list[Piece]]]) -> tuple[int, int]:
    """(the most inputs of any item, the latest start) of extend items (slot, start, pieces)."""
    return max(pieces_length(pieces) for _, _, pieces in items), max(start for _, start, _ in items)


def length_buckets(max_len: int) -> list[int]:
    """Prefill lengths captured as graphs: prompts are short; longer inputs run eagerly (rare, and not
    launch-bound)."""
    return [n for n in (16, 32, 64, 128, 256) if n <= max_len]


class ModelRunner:
    def __init__(self, llm: Qwen2LM, device: torch.device, dtype: torch.dtype, max_sessions: int, max_len: int,
                 use_cuda_graphs: bool = True):
        self.llm = llm
        self.device = device
        self.dtype = dtype
        config = llm.llm.config
        self.cache = KVCache(config.num_hidden_layers, max_sessions, max_len, config.num_key_value_heads,
                             config.head_dim, dtype, device)
        self.max_len = max_len
        self.vocab = llm.llm_decoder.out_features
        self.candidates = min(TOP_CANDIDATES, self.vocab)  # per row, copied back with the log-probs
        self.graphs: dict[tuple[int, int], _CapturedDecode] = {}
        self.extend_graphs: dict[tuple[int, int, int], _CapturedExtend] = {}  # (requests, length, key_len)
        self.batch_prefill = True  # False: extend_batch prefills one request at a time (the bench's comparison)
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self._host_rows: torch.Tensor | None = None  # pinned, for decode_result

    # --- inputs -----------------------------------------------------------------
    def embed(self, pieces: list[Piece]) -> torch.Tensor:
        parts = []
        for kind, ids in pieces:
            if kind == "sos":
                parts.append(self.llm.sos_embedding())
            elif kind == "task":
                parts.append(self.llm.task_embedding())
            elif kind == "text" and ids:
                parts.append(self.llm.embed_text(to_device(ids, self.device, torch.long)))
            elif kind == "speech" and ids:
                parts.append(self.llm.embed_speech(to_device(ids, self.device, torch.long)))
        return torch.cat(parts, dim=0)

    # --- LM steps -----------------------------------------------------------------
    def check_context(self, start: int, length: int) -> None:
        """CacheFullError if `length` inputs from position `start` would not fit a request's context."""
        if start + length > self.max_len:
            raise CacheFullError(f"context of {start + length} tokens exceeds the {self.max_len}-token limit")

    def extend(self, slot: int, start: int, pieces: list[Piece]) -> torch.Tensor:
        """Feed a request several inputs at positions start.. and return log-probs after the last one (CPU fp32)."""
        return self.extend_batch([(slot, start, pieces)])[0]

    def extend_batch(self, items: list[tuple[int, int, list[Piece]]]) -> list[torch.Tensor]:
        """`extend` for several requests, (slot, start, pieces) each, in one forward where one fits (a captured
        batch on a GPU; padded, eagerly, without CUDA graphs), else one after another."""
        return self.launch_extend_batch(items).result()

    @torch.inference_mode()
    def launch_extend_batch(self, items: list[tuple[int, int, list[Piece]]]) -> PendingLogprobs:
        """`extend_batch` queued on the device, not waited for. Raises CacheFullError (before queueing anything)
        if an item does not fit its context."""
        for _, start, pieces in items:
            self.check_context(start, pieces_length(pieces))
        longest, last_start = _extent(items)
        graph = self._extend_graph_for(len(items), longest, last_start) if self.use_cuda_graphs else None
        # Several requests go together in a captured batch, or eagerly where nothing is captured, as long as
        # padding one row to another's length does not run off its slot.
        together = len(items) == 1 or (self.batch_prefill and last_start + longest <= self.max_len
                                       and (graph is not None or not self.use_cuda_graphs))
        if together:
            rows = self._queue_extend(items, graph)
        else:
            # One forward each, queued one behind the other; each copy to the host is queued before the next
            # forward can reuse the captured output buffer.
            rows = []
            for item in items:
                alone = self._extend_graph_for(1, *_extent([item])) if self.use_cuda_graphs else None
                rows += self._queue_extend([item], alone)
        if self.device.type != "cuda":
            return PendingLogprobs(rows, None)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        return PendingLogprobs(rows, copied)

    def _queue_extend(self, items: list[tuple[int, int, list[Piece]]],
                      graph: "_CapturedExtend | None") -> list[torch.Tensor]:
        """One forward for `items` (captured `graph`, else eager), its log-probs' copy to the host queued."""
        if graph is None:  # no CUDA graphs, or one request longer than any captured prefill
            longest, last_start = _extent(items)
            graph = PaddedExtend(self, longest, last_start + longest, len(items))
        embeds = [self.embed(pieces) for _, _, pieces in items]
        logp = graph.run(embeds, [slot for slot, _, _ in items], [start for _, start, _ in items])[:len(items)]
        # On the CPU a copy too: a graph's output buffer is overwritten by its next replay.
        host = to_host(logp) if logp.device.type == "cuda" else logp.clone()
        return list(host.unbind(0))

    def _decode_forward(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                        key_len: int | None = None) -> torch.Tensor:
        embeds = self.llm.embed_speech(tokens).unsqueeze(1)
        attn = AttentionInputs.build(slots, positions, key_len or self.max_len, self.dtype)
        hidden = self.llm.llm(embeds, self.cache.k, self.cache.v, attn)
        return self.llm.logprobs(hidden[:, -1])

    def _decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     key_len: int) -> torch.Tensor:
        """The forward and each row's top-k candidates, packed as [log-probs | top probs | top ids] (fp32; ids
        are exact in fp32, the vocabulary being far below 2**24), for one device-to-host copy."""
        logp = self._decode_forward(tokens, slots, positions, key_len).float()
        top_probs, top_ids = logp.softmax(dim=-1).topk(self.candidates, dim=-1)
        return torch.cat([logp, top_probs, top_ids.float()], dim=-1)

    def decode(self, rows: list[DecodeRow]) -> list[StepDistribution]:
        """One speech token for each row -> each row's distribution (log-probs on the CPU, fp32)."""
        return self.decode_result(self.launch_decode(rows))

    @torch.inference_mode()
    def launch_decode(self, rows: list[DecodeRow]) -> tuple[torch.Tensor, int]:
        """`decode` up to its device work, queued and not waited for: (packed rows on the device, row count) for
        `decode_result`. The engine launches a vocoder batch in between, while the GPU runs the step."""
        for row in rows:
            if row.position + 1 > self.max_len:
                raise CacheFullError(f"slot {row.slot}: context exceeds the {self.max_len}-token limit")
        count = len(rows)
        key_len = max(r.position for r in rows) + 1
        graph = self._graph_for(count, key_len)
        pad = graph.batch - count if graph is not None else 0
        # One host tensor for the three inputs, padded to the graph's batch: few torch calls per step (each
        # releases the GIL, which the vocoder thread may then hold for a while).
        host = torch.tensor([[r.token for r in rows] + [0] * pad,
                             [r.slot for r in rows] + [self.cache.scratch_slot] * pad,
                             [r.position for r in rows] + [0] * pad], dtype=torch.long)
        if graph is not None:
            return graph.run(host), count
        # Eager: attend only as far as the longest context in the batch.
        tokens, slots, positions = host.to(self.device).unbind(0)
        return self._decode_step(tokens, slots, positions.unsqueeze(1), key_len), count

    @torch.inference_mode()
    def decode_result(self, launched: tuple[torch.Tensor, int]) -> list[StepDistribution]:
        """The distributions of a `launch_decode`, waiting for the device. Valid until the next decode step: on a
        GPU they are views of one pinned host buffer (a pageable copy of 32 rows of log-probs, 850 KB, costs a
        few hundred microseconds of every step)."""
        packed, count = launched
        rows = packed[:count]
        if rows.device.type != "cuda":
            return self._distributions(rows.cpu())
        if self._host_rows is None or self._host_rows.shape[0] < count or self._host_rows.shape[1] != rows.shape[1]:
            self._host_rows = torch.empty(max(count, self.cache.num_slots), rows.shape[1], dtype=rows.dtype,
                                          pin_memory=True)
        host = self._host_rows[:count]
        host.copy_(rows, non_blocking=True)
        torch.cuda.current_stream(rows.device).synchronize()
        return self._distributions(host)

    def _distributions(self, packed: torch.Tensor) -> list[StepDistribution]:
        """Per-row distributions from `_decode_step`'s packed rows (on the CPU): numpy views, no copies."""
        vocab, candidates = self.vocab, self.candidates
        rows = packed.numpy()
        probs, ids = rows[:, vocab:vocab + candidates], rows[:, vocab + candidates:].astype(np.int64)
        logps = packed[:, :vocab].unbind(0)
        return [StepDistribution(logps[i], probs[i], ids[i]) for i in range(packed.shape[0])]

    # --- CUDA graphs ----------------------------------------------------------------
    def _graph_for(self, batch: int, key_len: int) -> _CapturedDecode | None:
        # The smallest captured (batch, context) shape that holds this step; attention cost follows the context.
        for size, keys in sorted(self.graphs):
            if size >= batch and keys >= key_len:
                return self.graphs[(size, keys)]
        return None

    def _extend_graph_for(self, batch: int, length: int, last_start: int) -> _CapturedExtend | None:
        # Every row's padded inputs must stay inside the attended (and cached) positions.
        for rows, size, keys in sorted(self.extend_graphs):
            if rows >= batch and size >= length and keys >= last_start + size:
                return self.extend_graphs[(rows, size, keys)]
        return None

    def key_buckets(self) -> list[int]:
        buckets, keys = [], 256
        while keys < self.max_len:
            buckets.append(keys)
            keys *= 2
        return buckets + [self.max_len]

    @torch.inference_mode()
    def capture(self, max_batch: int) -> None:
        if not self.use_cuda_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(batch_ladder(max_batch), reverse=True):
            for keys in sorted(self.key_buckets(), reverse=True):
                self.graphs[(size, keys)] = _CapturedDecode(self, size, keys, pool)
        log.info("captured %d decode CUDA graphs: batch %s x context %s", len(self.graphs),
                 batch_ladder(max_batch), self.key_buckets())
        # One request up to the longest length bucket; requests arriving together up to MAX_BATCHED_PREFILL each.
        batches = [1] + [b for b in PREFILL_BATCHES if b <= max_batch]
        for rows in sorted(batches, reverse=True):
            for size in sorted(length_buckets(self.max_len), reverse=True):
                if rows > 1 and size > MAX_BATCHED_PREFILL:
                    continue
                for keys in sorted(self.key_buckets(), reverse=True):
                    if keys >= size:
                        self.extend_graphs[(rows, size, keys)] = _CapturedExtend(self, size, keys, pool, rows)
        log.info("captured %d prefill CUDA graphs: requests %s x length %s (at most %d for several) x context %s",
                 len(self.extend_graphs), batches, length_buckets(self.max_len), MAX_BATCHED_PREFILL,
                 self.key_buckets())
