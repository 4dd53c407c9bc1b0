"""CUDA graphs for the flow's CFM sampler (10 Euler steps x the estimator, classifier-free guided).

Eager, one flow call is launch-bound (about 300 ms on an H100/H200 at full size, whatever the length), which
alone would blow the first-chunk budget. The sampler has no data-dependent control flow, so each (batch, frames)
shape is captured once and replayed. Inputs are padded up to a bucket: batch up the engine's ladder, frames
to a multiple of the estimator's chunk. Padding is exact, not approximate: padded frames are masked out and
come after every real frame (the estimator's convolutions and chunk attention are causal), and padded rows
are independent samples.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .cuda_graphs import bucket_for, buckets_within, capture_graph, replay

log = logging.getLogger(__name__)


class _CapturedSampler:
    def __init__(self, decoder: nn.Module, feats: int, batch: int, frames: int, n_timesteps: int,
                 dtype: torch.dtype, device: torch.device, pool):
        self.mu = torch.zeros(batch, feats, frames, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, 1, frames, dtype=dtype, device=device)
        self.spks = torch.zeros(batch, feats, dtype=dtype, device=device)
        self.cond = torch.zeros(batch, feats, frames, dtype=dtype, device=device)
        self.flags = torch.zeros(batch, dtype=torch.bool, device=device)

        def run():
            return decoder(mu=self.mu, mask=self.mask, n_timesteps=n_timesteps, spks=self.spks, cond=self.cond,
                           streaming=self.flags)[0]

        self.graph, self.out = capture_graph(run, device, pool)

    def __call__(self, mu, mask, spks, cond, flags) -> torch.Tensor:
        batch, _, frames = mu.shape
        for static, value in ((self.mu, mu), (self.mask, mask), (self.cond, cond)):
            static.zero_()
            static[:batch, :, :frames].copy_(value)
        self.spks.zero_()
        self.spks[:batch].copy_(spks)
        self.flags.zero_()
        self.flags[:batch].copy_(flags)
        replay(self.graph)
        return self.out[:batch, :, :frames]


def frame_buckets(unit: int, max_frames: int) -> list[int]:
    """Captured frame counts: every chunk up to 6 chunks (first chunks and short utterances, where padding would
    cost the most), then steps of about a quarter, so a long prefix pads at most ~25% instead of being eager."""
    buckets = [unit * n for n in range(1, 7)]
    units = 8
    while unit * units < max_frames:
        buckets.append(unit * units)
        units += max(2, units // 4)
    top = -(-max_frames // unit) * unit
    return [b for b in buckets if b < top] + [top]


class GraphedCFM(nn.Module):
    """Drop-in for the flow's `decoder` (same call) that replays captured graphs, eager beyond the buckets."""

    def __init__(self, decoder: nn.Module, mel_bins: int, batch_sizes: list[int], frame_unit: int,
                 max_frames: int, dtype: torch.dtype):
        super().__init__()
        self.inner = decoder
        self.mel_bins = mel_bins
        self.batch_sizes = sorted(batch_sizes)
        self.frame_unit = frame_unit
        self.max_frames = max_frames
        self.frame_sizes = frame_buckets(frame_unit, max_frames)
        self.dtype = dtype
        self.graphs: dict[tuple[int, int, int], _CapturedSampler] = {}
        self.pool = None
        # Shapes met while serving that have no graph yet: they run eagerly, and the engine captures them
        # when it is idle (capturing while the LM thread launches kernels would corrupt the capture).
        self.missing: set[tuple[int, int, int]] = set()
        self.capture_disabled = False  # set after a capture failed while serving: stay eager, stop retrying
        self.calls = {"graphed": 0, "eager": 0}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def _bucket(self, batch: int, frames: int) -> tuple[int, int] | None:
        return bucket_for(self.batch_sizes, self.frame_sizes, batch, frames)

    def padded_shape(self, batch: int, frames: int) -> tuple[int, int]:
        """The (batch, frames) a call of this size really computes: its graph's bucket, or itself if eager."""
        return self._bucket(batch, frames) or (batch, frames)

    def shapes_within(self, frame_rows: int) -> list[tuple[int, int]]:
        """Every bucket a vocoder batch of at most `frame_rows` padded batch x frames can use (batch 1 always)."""
        return buckets_within(self.batch_sizes, self.frame_sizes, frame_rows)

    def capture(self, batch: int, frames: int, n_timesteps: int = 10) -> None:
        bucket = self._bucket(batch, frames)
        if bucket is None or (*bucket, n_timesteps) in self.graphs:
            return
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        device = next(self.inner.parameters()).device
        with torch.inference_mode(), torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32,
                                                    cache_enabled=False):
            self.graphs[(*bucket, n_timesteps)] = _CapturedSampler(self.inner, self.mel_bins, bucket[0], bucket[1],
                                                                   n_timesteps, self.dtype, device, self.pool)

    def forward(self, mu, mask, n_timesteps, temperature=1.0, spks=None, cond=None, streaming=False):
        batch, _, frames = mu.shape
        bucket = self._bucket(batch, frames)
        key = None if bucket is None else (*bucket, n_timesteps)
        if temperature != 1.0 or key is None or not torch.is_tensor(streaming) or key not in self.graphs:
            if key is not None and temperature == 1.0 and not self.capture_disabled:
                self.missing.add(key)
            self.calls["eager"] += 1
            return self.inner(mu, mask, n_timesteps, temperature, spks, cond, streaming)
        self.calls["graphed"] += 1
        return self.graphs[key](mu, mask, spks, cond, streaming), None

    def capture_missing(self, limit: int = 1) -> int:
        """Capture up to `limit` shapes seen while serving; call only while no other thread uses the GPU."""
        done = 0
        while self.missing and done < limit:
            batch, frames, steps = self.missing.pop()
            log.info("capturing flow sampler graph for batch %d x %d frames", batch, frames)
            self.capture(batch, frames, steps)
            done += 1
        return done


class _CapturedEncoder:
    def __init__(self, encoder: nn.Module, batch: int, tokens: int, width: int, shared: dict, pool):
        self._bind(encoder, batch, tokens, width, shared)
        self.graph, (self.h, self.up_lens) = capture_graph(self._run, self.xs.device, pool)

    def _bind(self, encoder: nn.Module, batch: int, tokens: int, width: int, shared: dict) -> None:
        self.encoder, self.batch, self.tokens, self.width = encoder, batch, tokens, width
        self.rel_tables = encoder.relative_tables(tokens, shared["xs"].device)
        dim = shared["xs"].shape[-1]
        self.xs = shared["xs"][: batch * width].view(batch, width, dim)
        self.token_lens = shared["token_lens"][:batch]
        self.out_lens = shared["out_lens"][:batch]
        self.streaming = shared["streaming"][:batch]

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.encode(self.xs, self.token_lens, self.out_lens, self.streaming, max_out=self.tokens,
                                   rel_tables=self.rel_tables)

    def replay(self) -> None:
        self.graph.replay()


class GraphedEncoder(nn.Module):
    """Drop-in for the flow's `encoder` whose batched `encode` replays captured graphs per (batch, tokens)
    bucket (eager beyond them). The conformer stack is several hundred small kernels launched from Python on
    the vocoder thread; replayed, it costs a few launches. Padding is exact: tokens past every request's end
    are masked as a longer request's would be (see `encode`'s max_out), padded rows are independent."""

    def __init__(self, encoder: nn.Module, batch_sizes: list[int], token_sizes: list[int], dtype: torch.dtype,
                 input_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inner = encoder
        self.input_dtype = input_dtype  # of the embedded tokens the flow passes in (its embedding's dtype)
        self.batch_sizes = sorted(batch_sizes)
        self.token_sizes = sorted(token_sizes)
        self.dtype = dtype
        self.graphs: dict[tuple[int, int], _CapturedEncoder] = {}
        self.calls = {"graphed": 0, "eager": 0}
        self._shared: dict | None = None
        self._pool = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def capture_all(self, shapes: list[tuple[int, int]], dim: int, captured=_CapturedEncoder) -> None:
        """shapes: (batch, tokens) buckets. A capture that fails leaves the rest eager (logged), never the
        engine down."""
        lookahead = self.inner.pre_lookahead_len
        device = next(self.inner.parameters()).device
        rows = max(b * (t + lookahead) for b, t in shapes)
        batch = max(b for b, _ in shapes)
        self._shared = {
            "xs": torch.zeros(rows, dim, dtype=self.input_dtype, device=device),
            "token_lens": torch.ones(batch, dtype=torch.long, device=device),
            "out_lens": torch.ones(batch, dtype=torch.long, device=device),
            "streaming": torch.zeros(batch, dtype=torch.bool, device=device),
        }
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                                                        cache_enabled=False):
                for b, t in sorted(shapes, key=lambda s: -s[0] * s[1]):
                    self.graphs[(b, t)] = captured(self.inner, b, t, t + lookahead, self._shared, self._pool)
        except Exception:  # eager encoding is slower, not wrong: serve on without the graphs
            log.exception("flow encoder graph capture failed; the encoder runs eagerly")
            self.graphs.clear()
            return
        log.info("captured %d flow encoder CUDA graphs", len(self.graphs))

    def encode(self, xs, token_lens, out_lens, streaming, max_out: int | None = None):
        batch, width, _ = xs.shape
        needed = int(out_lens.max()) if max_out is None else max_out
        key = bucket_for(self.batch_sizes, self.token_sizes, batch, needed)
        graph = self.graphs.get(key) if key is not None else None
        if graph is None or xs.dtype != graph.xs.dtype or width > graph.width or not torch.is_tensor(streaming):
            self.calls["eager"] += 1
            return self.inner.encode(xs, token_lens, out_lens, streaming, max_out)
        self.calls["graphed"] += 1
        graph.xs.zero_()
        graph.xs[:batch, :width].copy_(xs)
        for static, value in ((graph.token_lens, token_lens), (graph.out_lens, out_lens)):
            static.fill_(1)  # padded rows: one token, so no row attends over nothing
            static[:batch].copy_(value)
        graph.streaming.zero_()
        graph.streaming[:batch].copy_(streaming)
        graph.replay()
        return graph.h[:batch], graph.up_lens[:batch]
