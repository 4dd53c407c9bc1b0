"""CUDA graphs for HiFT, the vocoder: mel + excitation -> 24 kHz audio.

Eager, a HiFT batch is about a thousand small kernels launched from Python. On the vocoder thread that Python
competes for the GIL with the LM loop, so under load it made each vocoder batch several times slower than its
GPU time. Each (batch, frames) bucket is captured once and replayed. Padding is exact: HiFT masks every layer
per item (see `HiFTGenerator.inference_batch`), padded rows are independent, and the source noise is drawn
before the replay from each request's own generator, exactly as the eager call draws it.
"""
from __future__ import annotations

import logging

import torch

from .cuda_graphs import bucket_for, buckets_within, capture_graph
from .host_copy import to_device
from .modules.hift import HiFTGenerator

log = logging.getLogger(__name__)

HIFT_FRAME_BUCKETS = (64, 128, 224, 320, 448, 640, 1024)  # first chunks are 50 frames, later ones 108 and 208


class _StaticInputs:
    """Input buffers shared by every graph (one vocoder thread replays one graph at a time): each graph
    records views of the same memory, sized for the largest bucket."""

    def __init__(self, hift: HiFTGenerator, shapes: list[tuple[int, int]], cache_len: int, device: torch.device):
        spf, harmonics = hift.samples_per_frame, hift.m_source.harmonics
        frame_rows = max(b * f for b, f in shapes)
        rows = max(b for b, _ in shapes)
        self.mel = torch.zeros(frame_rows * 80, device=device)
        self.noise = torch.zeros(frame_rows * spf * harmonics, device=device)
        self.cache = torch.zeros(rows * cache_len, device=device)
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.cache_lengths = torch.zeros(rows, dtype=torch.long, device=device)


class _CapturedHiFT:
    def __init__(self, hift: HiFTGenerator, batch: int, frames: int, cache_len: int, shared: _StaticInputs, pool):
        self._bind(hift, batch, frames, cache_len, shared)
        self.graph, (self.speech, self.source) = capture_graph(self._run, self.mel.device, pool)

    def _bind(self, hift: HiFTGenerator, batch: int, frames: int, cache_len: int, shared: _StaticInputs) -> None:
        spf, harmonics = hift.samples_per_frame, hift.m_source.harmonics
        self.hift = hift
        self.mel = shared.mel[: batch * 80 * frames].view(batch, 80, frames)
        self.noise = shared.noise[: batch * frames * spf * harmonics].view(batch, frames * spf, harmonics)
        self.cache = shared.cache[: batch * cache_len].view(batch, 1, cache_len)
        self.lengths = shared.lengths[:batch]
        self.cache_lengths = shared.cache_lengths[:batch]

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hift._synthesize(self.mel, self.lengths, self.cache, self.cache_lengths, None, self.noise)

    def replay(self) -> None:
        self.graph.replay()


class GraphedHiFT:
    """`inference_batch` of HiFT (same call, same results) replaying captured graphs; eager outside the buckets."""

    def __init__(self, hift: HiFTGenerator, batch_sizes: list[int], cache_len: int, max_frame_rows: int,
                 frame_buckets: tuple[int, ...] = HIFT_FRAME_BUCKETS):
        self.inner = hift
        self.batch_sizes = sorted(batch_sizes)
        self.frame_buckets = sorted(frame_buckets)
        self.cache_len = cache_len
        self.max_frame_rows = max_frame_rows
        self.graphs: dict[tuple[int, int], _CapturedHiFT] = {}
        self.calls = {"graphed": 0, "eager": 0}
        self._shared: _StaticInputs | None = None
        self._pool = None

    def shapes(self) -> list[tuple[int, int]]:
        """Every bucket a vocoder batch within `max_frame_rows` padded frame-rows can need (batch 1 always)."""
        return buckets_within(self.batch_sizes, self.frame_buckets, self.max_frame_rows)

    @torch.inference_mode()
    def capture_all(self, captured=_CapturedHiFT) -> None:
        shapes = self.shapes()
        device = next(self.inner.parameters()).device
        self._shared = _StaticInputs(self.inner, shapes, self.cache_len, device)
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        for batch, frames in sorted(shapes, key=lambda s: -s[0] * s[1]):
            self.graphs[(batch, frames)] = captured(self.inner, batch, frames, self.cache_len, self._shared, self._pool)
        log.info("captured %d HiFT CUDA graphs: frames %s", len(self.graphs), self.frame_buckets)

    def _bucket(self, batch: int, frames: int) -> tuple[int, int] | None:
        bucket = bucket_for(self.batch_sizes, self.frame_buckets, batch, frames)
        return bucket if bucket in self.graphs else None

    @torch.inference_mode()
    def inference_batch(self, mels, cache_sources=None, generators=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        count = len(mels)
        cache_sources = list(cache_sources) if cache_sources is not None else [None] * count
        generators = list(generators) if generators is not None else [None] * count
        frames = [int(m.shape[-1]) for m in mels]
        caches = [0 if c is None else int(c.shape[-1]) for c in cache_sources]
        spf = self.inner.samples_per_frame
        bucket = self._bucket(count, max(frames)) if count else None
        usable = (bucket is not None and len(cache_sources) == len(generators) == count
                  and all(isinstance(g, torch.Generator) for g in generators)
                  and all(c <= min(self.cache_len, n * spf) for c, n in zip(caches, frames)))
        if not usable:
            self.calls["eager"] += 1
            return self.inner.inference_batch(mels, cache_sources, generators)
        self.calls["graphed"] += 1
        graph = self.graphs[bucket]
        graph.mel.zero_()
        graph.cache.zero_()
        graph.noise.zero_()
        for item, (mel, cache, generator, n) in enumerate(zip(mels, cache_sources, generators, frames)):
            graph.mel[item, :, :n].copy_(mel[0])
            if cache is not None:
                graph.cache[item, :, : cache.shape[-1]].copy_(cache[0])
            graph.noise[item, : n * spf].copy_(self.inner.m_source.draw(1, n * spf, generator, mel.device)[0])
        graph.lengths.fill_(1)
        graph.lengths[:count].copy_(to_device(frames, graph.lengths.device, torch.long))
        graph.cache_lengths.zero_()
        graph.cache_lengths[:count].copy_(to_device(caches, graph.cache_lengths.device, torch.long))
        graph.replay()
        # Copies: the graph's outputs are overwritten by its next replay, and callers keep the source's tail.
        return [(graph.speech[item:item + 1, : n * spf].clone(), graph.source[item:item + 1, :, : n * spf].clone())
                for item, n in enumerate(frames)]
