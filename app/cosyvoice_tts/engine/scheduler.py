"""Decides what each engine step runs.

Every step: one LM forward for every request that can decode (batched; prompts and other multi-token inputs go
through `extend` within a token budget), then the vocoder chunks that are due. Streaming first: a request still
waiting for its first audio goes ahead of streams that already have audio buffered, and among the others the
one with the least audio ahead of playback goes first, so no stream starves.

The LM and the vocoder share one GPU, and under load the vocoder keeps it busy most of the time. A new request's
first chunk waits on 28 LM steps, each slowed by whatever vocoder batch runs beside it. So while requests are
still producing their first chunk's tokens, a batch of nothing but chunks for streams with audio to spare is not
started (`hold_ahead_s`); it waits until a first chunk or a stream running low starts a batch. A batch for a
first chunk takes only other first chunks and chunks of streams running low: the chunks that can wait would make
it longer, and go in the next batch (`first_chunks_apart`). And a batch is not padded up to the next CUDA-graph
batch size for chunks that can wait: those go in the next batch instead of costing padded rows in this one
(`fit_batches`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .lm_program import pieces_length
from .request import Request


STALL_GUARD_S = 0.5  # a started stream with less audio ahead than this outranks first chunks at the vocoder


@dataclass
class StepPlan:
    extend: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    chunks: list[Request] = field(default_factory=list)


@dataclass
class SchedulerConfig:
    max_extend_tokens: int = 2048  # prompt tokens prefilled per step, so running streams keep stepping
    max_decode_batch: int | None = None  # None: every runnable request decodes each step (1: per-request path)
    # Padded batch x mel frames per flow call: bounds how long one vocoder batch keeps the next first chunk waiting.
    max_vocoder_frames: int = 8192
    # While a request is producing its first chunk's tokens, chunks of streams with at least this much audio
    # buffered ahead of playback do not start a vocoder batch by themselves (None: they always may).
    hold_ahead_s: float | None = 1.0
    # Trim a vocoder batch to the graph batch size below it when the trimmed chunks can wait (see the module doc).
    fit_batches: bool = True
    # A batch headed by a first chunk takes no chunk that can wait: they go in the next batch, so the first
    # chunk's batch is as short as it can be (see the module doc).
    first_chunks_apart: bool = True


def is_single_speech_token(request: Request) -> bool:
    pieces = request.program.lm_input
    return len(pieces) == 1 and pieces[0][0] == "speech" and len(pieces[0][1]) == 1


def chunk_priority(request: Request, now: float) -> tuple[int, float]:
    """Vocoder order: streams about to run dry, then first chunks, then the rest by audio buffered ahead.

    First chunks go ahead of streams that are safely ahead of playback, but not of one that would stall while
    a first-chunk batch runs: otherwise a steady arrival of new requests could hold a long stream's next chunk
    back until its listener hears a gap."""
    ahead = audio_ahead_s(request, now)
    if request.stats.first_chunk_at is None:
        return 1, ahead
    return (2 if can_wait(request, now) else 0), ahead


def audio_ahead_s(request: Request, now: float) -> float:
    """Seconds of audio delivered beyond what real-time playback from the first chunk has consumed."""
    stats = request.stats
    if stats.first_chunk_at is None:
        return 0.0
    delivered = stats.audio_samples / request.sample_rate
    return delivered - (now - stats.first_chunk_at)


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self._turn = 0

    def plan(self, active: list[Request]) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_extend_tokens
        for request in active:
            program = request.program
            if program is None or not program.runnable():
                continue
            if is_single_speech_token(request):
                plan.decode.append(request)
            else:
                size = pieces_length(program.lm_input)
                if not plan.extend or size <= budget:
                    plan.extend.append(request)
                    budget -= size

        limit = self.config.max_decode_batch
        if limit is not None and len(plan.decode) > limit:
            # Round-robin, so a capped batch still serves every stream in turn.
            self._turn = (self._turn + limit) % len(plan.decode)
            rotated = plan.decode[self._turn:] + plan.decode[: self._turn]
            plan.decode = rotated[:limit]

        now = time.monotonic()
        ready = [r for r in active
                 if r.stream is not None and not r.vocoding and r.stream.has_chunk()]
        ready.sort(key=lambda r: chunk_priority(r, now))
        if ready and self._hold(active, ready, now):
            ready = []
        plan.chunks = ready[:1] if self.config.max_decode_batch == 1 else ready
        return plan

    def _hold(self, active: list[Request], ready: list[Request], now: float) -> bool:
        """Whether the ready chunks (priority order) should wait: none is a first chunk or short of
        `hold_ahead_s` of buffered audio, and some request is still producing its first chunk's tokens."""
        hold = self.config.hold_ahead_s
        head = ready[0]
        if hold is None or head.stats.first_chunk_at is None or audio_ahead_s(head, now) < hold:
            return False
        return any(producing_first_chunk(r) for r in active)


def producing_first_chunk(request: Request) -> bool:
    """Still decoding the tokens of its first chunk (not yet handed to the vocoder, not yet ready for it)."""
    return (request.stats.first_vocode_at is None and request.stream is not None and not request.vocoding
            and not request.stream.has_chunk())


def can_wait(request: Request, now: float) -> bool:
    """A chunk whose stream has audio enough to wait one more vocoder batch (ranked after first chunks)."""
    return request.stats.first_chunk_at is not None and audio_ahead_s(request, now) >= STALL_GUARD_S


def pick_vocoder_batch(ready: list[Request], frames: list[int], budget: int, shape, may_cut=None,
                       may_leave=None) -> list[Request]:
    """The next vocoder batch from `ready` (in priority order) with each one's flow frames.

    A batch costs its padded shape, `shape(n, longest) -> (n', frames')` (the CUDA-graph bucket it runs in), and
    stays within `budget` padded frame-rows, the head always included. When the head is a first chunk, only chunks
    that fit its frame bucket join it: a short first chunk is never padded up to a long prefix's length.
    `may_cut(request)`: if given, a batch that its graph would pad is cut to the largest size that needs no padding
    when every chunk cut off may wait for the next batch (they are the last in priority order).
    `may_leave(request)`: if given, a batch headed by a first chunk takes no chunk that it says may wait."""
    first_head = ready[0].stats.first_chunk_at is None
    cap = shape(1, frames[0])[1] if first_head else None
    chosen: list[Request] = []
    lengths: list[int] = []
    for request, length in zip(ready, frames):
        if chosen and cap is not None and length > cap:
            continue
        if chosen and first_head and may_leave is not None and request.stats.first_chunk_at is not None \
                and may_leave(request):
            continue
        rows, padded = shape(len(chosen) + 1, max(lengths + [length]))
        if chosen and rows * padded > budget:
            continue
        chosen.append(request)
        lengths.append(length)
    if may_cut is None:
        return chosen
    for size in range(len(chosen), 0, -1):
        if shape(size, max(lengths[:size]))[0] == size:
            break
        if not may_cut(chosen[size - 1]):
            return chosen  # an urgent chunk would be cut: pad instead
    return chosen[:size]
