"""Owns the device side of the speech-token LM: weights, KV cache, and the captured decode step.

Two kinds of LM work: `extend` feeds one request several inputs (prompt prefill, bistream text, re-fed inputs),
eagerly; `decode` feeds many requests one speech token each in a single forward. On CUDA the decode step is
captured as CUDA graphs for a ladder of batch sizes (eager decoding is launch-bound: ~64 ms vs ~3 ms a step on an
H100 for this model), with padded rows writing into a scratch slot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .cuda_graphs import capture_graph
from .kv_cache import CacheFullError, KVCache
from .lm_program import Piece, pieces_length
from .modules.llm import Qwen2LM
from .modules.qwen2 import AttentionInputs
from .sampling import StepDistribution

# Candidates copied back per row; RAS keeps at most top_k (25) of them.
TOP_CANDIDATES = 32

log = logging.getLogger(__name__)


@dataclass
class DecodeRow:
    slot: int
    position: int
    token: int


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 32 else 16))
    return [s for s in sizes if s < max_batch] + [max_batch]


class _CapturedDecode:
    """One CUDA graph of the decode step for a fixed batch size, with its static input/output buffers."""

    def __init__(self, runner: "ModelRunner", batch: int, key_len: int, pool):
        device = runner.device
        self.batch = batch
        self.key_len = key_len
        self.scratch_slot = runner.cache.scratch_slot
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.full((batch,), runner.cache.scratch_slot, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph, self.logp = capture_graph(
            lambda: runner._decode_forward(self.tokens, self.slots, self.positions, key_len), device, pool,
            warmups=2, error_mode="global")

    def run(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.slots[:n].copy_(slots)
        self.positions[:n, 0].copy_(positions)
        if n < self.batch:
            self.slots[n:].fill_(self.scratch_slot)
            self.positions[n:].zero_()
        self.graph.replay()
        return self.logp[:n]


class _CapturedExtend:
    """One CUDA graph of a one-request prefill of up to `length` inputs attending over `key_len` positions.

    Inputs are right-padded with zero embeddings. The padded inputs sit after every real one, so causal
    attention keeps them out of the real outputs; they write keys and values into the request's own slot past
    its last real position, which the next real input there overwrites before anything reads it."""

    def __init__(self, runner: "ModelRunner", length: int, key_len: int, pool):
        device = runner.device
        hidden = runner.llm.llm.config.hidden_size
        self.length = length
        self.key_len = key_len
        self.embeds = torch.zeros(1, length, hidden, dtype=runner.dtype, device=device)
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(length, device=device).unsqueeze(0)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logp = capture_graph(lambda: self._forward(runner), device, pool, warmups=2,
                                              error_mode="global")

    def _forward(self, runner: "ModelRunner") -> torch.Tensor:
        attn = AttentionInputs.build(self.slots, self.positions, self.key_len, runner.dtype)
        hidden = runner.llm.llm(self.embeds, runner.cache.k, runner.cache.v, attn)
        return runner.llm.logprobs(hidden[0].index_select(0, self.last))

    def run(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        n = embeds.shape[1]
        self.embeds.zero_()
        self.embeds[:, :n].copy_(embeds)
        self.slots.fill_(slot)
        torch.arange(start, start + self.length, out=self.positions[0])
        self.last.fill_(n - 1)
        self.graph.replay()
        return self.logp[0]


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
        self.graphs: dict[tuple[int, int], _CapturedDecode] = {}
        self.extend_graphs: dict[tuple[int, int], _CapturedExtend] = {}
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"

    # --- inputs -----------------------------------------------------------------
    def embed(self, pieces: list[Piece]) -> torch.Tensor:
        parts = []
        for kind, ids in pieces:
            if kind == "sos":
                parts.append(self.llm.sos_embedding())
            elif kind == "task":
                parts.append(self.llm.task_embedding())
            elif kind == "text" and ids:
                parts.append(self.llm.embed_text(torch.tensor(ids, dtype=torch.long, device=self.device)))
            elif kind == "speech" and ids:
                parts.append(self.llm.embed_speech(torch.tensor(ids, dtype=torch.long, device=self.device)))
        return torch.cat(parts, dim=0)

    # --- LM steps -----------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, slot: int, start: int, pieces: list[Piece]) -> torch.Tensor:
        """Feed a request several inputs at positions start.. and return log-probs after the last one (CPU fp32)."""
        length = pieces_length(pieces)
        if start + length > self.max_len:
            raise CacheFullError(f"context of {start + length} tokens exceeds the {self.max_len}-token limit")
        embeds = self.embed(pieces).unsqueeze(0)
        graph = self._extend_graph_for(length, start)
        if graph is not None:
            return graph.run(embeds, slot, start).float().cpu()
        positions = torch.arange(start, start + length, device=self.device).unsqueeze(0)
        slots = torch.tensor([slot], dtype=torch.long, device=self.device)
        attn = AttentionInputs.build(slots, positions, start + length, self.dtype)
        hidden = self.llm.llm(embeds, self.cache.k, self.cache.v, attn)
        return self.llm.logprobs(hidden[:, -1]).squeeze(0).cpu()

    def _decode_forward(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                        key_len: int | None = None) -> torch.Tensor:
        embeds = self.llm.embed_speech(tokens).unsqueeze(1)
        attn = AttentionInputs.build(slots, positions, key_len or self.max_len, self.dtype)
        hidden = self.llm.llm(embeds, self.cache.k, self.cache.v, attn)
        return self.llm.logprobs(hidden[:, -1])

    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow]) -> list[StepDistribution]:
        """One speech token for each row -> each row's distribution (log-probs on the CPU, fp32)."""
        for row in rows:
            if row.position + 1 > self.max_len:
                raise CacheFullError(f"slot {row.slot}: context exceeds the {self.max_len}-token limit")
        # One host tensor and one copy for the three inputs: fewer torch calls per step (each releases the GIL).
        host = torch.tensor([[r.token for r in rows], [r.slot for r in rows], [r.position for r in rows]],
                            dtype=torch.long)
        key_len = max(r.position for r in rows) + 1
        tokens, slots, positions = host.to(self.device, non_blocking=True).unbind(0)
        graph = self._graph_for(len(rows), key_len)
        if graph is not None:
            logp = graph.run(tokens, slots, positions)
        else:
            # Eager: attend only as far as the longest context in the batch.
            logp = self._decode_forward(tokens, slots, positions.unsqueeze(1), key_len)
        return self._distributions(logp)

    def _distributions(self, logp: torch.Tensor) -> list[StepDistribution]:
        """Per-row distributions with their top-k candidates, computed for the whole batch on the device."""
        logp = logp.float()
        vocab = logp.shape[-1]
        top_probs, top_ids = logp.softmax(dim=-1).topk(min(TOP_CANDIDATES, vocab), dim=-1)
        # One device-to-host copy for the three (ids are exact in fp32: the vocabulary is far below 2**24).
        host = torch.cat([logp, top_probs, top_ids.float()], dim=-1).cpu()
        rows = host.numpy()
        probs, ids = rows[:, vocab:vocab + top_probs.shape[-1]], rows[:, vocab + top_probs.shape[-1]:].astype(np.int64)
        logps = host[:, :vocab].unbind(0)
        return [StepDistribution(logps[i], probs[i], ids[i]) for i in range(host.shape[0])]

    # --- CUDA graphs ----------------------------------------------------------------
    def _graph_for(self, batch: int, key_len: int) -> _CapturedDecode | None:
        # The smallest captured (batch, context) shape that holds this step; attention cost follows the context.
        for size, keys in sorted(self.graphs):
            if size >= batch and keys >= key_len:
                return self.graphs[(size, keys)]
        return None

    def _extend_graph_for(self, length: int, start: int) -> _CapturedExtend | None:
        for size, keys in sorted(self.extend_graphs):
            if size >= length and keys >= start + size:
                return self.extend_graphs[(size, keys)]
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
        for size in sorted(length_buckets(self.max_len), reverse=True):
            for keys in sorted(self.key_buckets(), reverse=True):
                if keys >= size:
                    self.extend_graphs[(size, keys)] = _CapturedExtend(self, size, keys, pool)
        log.info("captured %d prefill CUDA graphs: length %s x context %s", len(self.extend_graphs),
                 length_buckets(self.max_len), self.key_buckets())
