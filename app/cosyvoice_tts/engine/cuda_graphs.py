"""What every graphed stage (LM decode and prefill, flow encoder and sampler, HiFT) shares: capturing one CUDA
graph, and the (batch, length) buckets that padded calls are replayed in."""
from __future__ import annotations

import threading
from contextlib import contextmanager
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


# --- replays another thread launches ------------------------------------------------------------------------
# Launching one of the flow sampler's step graphs (about a thousand kernels) takes the host about a millisecond,
# ten per batch. Launched from the engine loop, that is time no LM step is launched in; launched from a thread of
# its own, it costs the loop almost nothing, since a replay releases the GIL. Inside `deferred_replays()`, the
# replays made through `replay` are collected instead of launched, for such a thread (vocoder_worker.py).
_deferred = threading.local()


def replay(graph: torch.cuda.CUDAGraph) -> None:
    """`graph.replay()`, or queued for later when this thread is collecting replays (`deferred_replays`)."""
    pending = getattr(_deferred, "pending", None)
    if pending is None:
        graph.replay()
    else:
        pending.append(graph.replay)


@contextmanager
def deferred_replays():
    """Collect the replays made in the block (in order) instead of launching them; yields their list. Every
    kernel the block queues after a collected replay would run before it: in the block, nothing may read a
    collected replay's outputs."""
    if getattr(_deferred, "pending", None) is not None:
        raise RuntimeError("replays are being collected already")
    _deferred.pending = pending = []
    try:
        yield pending
    finally:
        _deferred.pending = None
