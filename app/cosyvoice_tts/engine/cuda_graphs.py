"""What every graphed stage (LM decode and prefill, flow encoder and sampler, HiFT) shares: capturing one CUDA
graph, and the (batch, length) buckets that padded calls are replayed in."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def smallest_at_least(sizes, value: int) -> int | None:
    """The smallest of `sizes` that holds `value`; None past the largest."""
    fitting = [s for s in sizes if s >= value]
    return min(fitting) if fitting else None


def bucket_for(batch_sizes: list[int], lengths: list[int], batch: int, length: int) -> tuple[int, int] | None:
    """The smallest (batch, length) bucket that holds a call of this size; None past the largest."""
    rows, size = smallest_at_least(batch_sizes, batch), smallest_at_least(lengths, length)
    return (rows, size) if rows is not None and size is not None else None


def buckets_within(batch_sizes: list[int], lengths: list[int], frame_rows: int) -> list[tuple[int, int]]:
    """Every bucket of at most `frame_rows` padded batch x length (batch 1 always): what a vocoder batch bounded
    by `max_vocoder_frames` can need."""
    return [(b, n) for n in lengths for b in batch_sizes if b == 1 or b * n <= frame_rows]


def capture_graph(fn: Callable[[], T], device: torch.device, pool, warmups: int = 1,
                  error_mode: str = "thread_local") -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `fn` `warmups` times (lazy initialisation must not happen during capture), then capture one call into
    a graph drawing on `pool`. Returns the graph and the outputs of the captured call: tensors the graph rewrites
    on every replay. error_mode "thread_local" lets other threads keep launching work on their own streams.

    On the default stream, where capture is impossible, both happen on side streams, the capture always on torch's
    one capture stream: a pool's freed blocks are reused only on the stream that allocated them, so a new stream
    per capture would give every graph fresh memory. On any other stream (an SM partition's, sm_partition.py),
    both happen on that stream: a graph captured there runs on the partition's SMs wherever it is replayed."""
    current = torch.cuda.current_stream(device)
    own_stream = current != torch.cuda.default_stream(device)
    stream = current if own_stream else torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=current if own_stream else None, capture_error_mode=error_mode):
        outputs = fn()
    return graph, outputs
