"""Drives one request's LM programme (`engine.lm_program`, unchanged) with an LM server that samples by itself.

The native engine asks the programme for its next input, runs one forward, and hands it the log-probabilities;
the programme samples. A server such as vLLM instead takes a prompt and keeps generating, feeding each sampled
token back as the next input. This driver reconciles the two without changing what the model sees:

- `context` is everything the native engine would have fed, in order, as pieces (sos, text, task, speech); a
  server request starts from the whole context (as prompt embeddings);
- each token the server samples is given to the programme as if its own sampler had drawn it; while the
  programme's next input is exactly that token's speech embedding (what the server feeds by itself), the server
  request goes on;
- otherwise (a special token the reference answers by re-feeding the previous input, a bistream fill token that
  waits for text, the final bistream step that appends text + task, a forced fill) the server request is ended
  and a new one starts from the updated context;
- what the programme's sampler would have decided is sent along as a `SubRequest`: how many tokens at most,
  which tokens stop the request, for how many steps end-of-speech is masked (the reference's redraw), the RAS
  window history, and a seed drawn from the request's own generator.

Nothing here imports vLLM: the server is any `client` with `generate(context, spec, request_id)`, an async
iterator of lists of newly sampled token ids (stop tokens included); tests use a pure-torch one.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from ..engine.errors import EngineError
from ..engine.lm_program import BistreamProgram, LMProtocolError, LMStep, Piece, WholeTextProgram, pieces_length
from ..engine.sampling import RasConfig, SamplingError

log = logging.getLogger(__name__)

_subrequest_ids = itertools.count(1)


@dataclass(frozen=True)
class SubRequest:
    """What one server request must do, decided from the programme's state when it starts."""

    max_tokens: int
    stop_token_ids: tuple[int, ...]
    mask_eos_steps: int  # eos is masked for the first N sampled tokens; -1: for all of them
    eos: int
    history: tuple[int, ...]  # decoded tokens before this request (the RAS window spans requests)
    seed: int
    ras: RasConfig


class LMClient(Protocol):
    def generate(self, context: list[Piece], spec: SubRequest, request_id: str) -> AsyncIterator[list[int]]:
        ...


@dataclass
class Segment:
    """One LM programme's run (a whole-text segment, or a whole bistream request) and its context."""

    program: Any
    request_id: str
    context: list[Piece] = field(default_factory=list)
    context_len: int = 0
    fed: bool = False  # whether program.lm_input is already in context
    subrequests: int = 0
    inbox: asyncio.Queue | None = None
    run: Any = None  # the engine's record of this segment (VllmEngine)


def single_speech(program, token: int) -> bool:
    pieces = program.lm_input
    return (not program.consumed and len(pieces) == 1 and pieces[0][0] == "speech"
            and list(pieces[0][1]) == [token])


def forced_fill_due(program) -> bool:
    return (isinstance(program, BistreamProgram) and not program.final and program.next_fill_index != -1
            and len(program.decoded) == program.next_fill_index)


class LMDriver:
    def __init__(self, client: LMClient, ras: RasConfig, max_context: int,
                 post: Callable[[Segment, list[int], bool], None], counters: dict | None = None):
        self.client = client
        self.ras = ras
        self.max_context = max_context
        self.post = post  # (segment, new speech tokens, lm done) -> None
        self.counters = counters if counters is not None else {}
        for key in ("vllm_subrequests", "vllm_restarts", "vllm_tokens"):
            self.counters.setdefault(key, 0)

    # --- programme plumbing ----------------------------------------------------------------
    @staticmethod
    def apply(segment: Segment, item) -> None:
        kind, value = item
        if kind == "text":
            segment.program.push_text(value)
        elif kind == "end":
            segment.program.end_text()

    def drain_inbox(self, segment: Segment) -> None:
        while segment.inbox is not None and not segment.inbox.empty():
            self.apply(segment, segment.inbox.get_nowait())

    def feed(self, segment: Segment) -> None:
        """Append the programme's pending input to the context (what the native engine would feed now)."""
        pieces = segment.program.take_input()
        length = pieces_length(pieces)
        if segment.context_len + length > self.max_context:
            raise EngineError("context_full", f"context of {segment.context_len + length} tokens exceeds the "
                                              f"{self.max_context}-token limit")
        for kind, ids in pieces:
            last = segment.context[-1] if segment.context else None
            if kind == "speech" and last is not None and last[0] == "speech":
                last[1].extend(ids)  # one run of speech tokens: one embedding lookup
            else:
                segment.context.append((kind, list(ids)))
        segment.context_len += length
        segment.fed = True

    def step(self, segment: Segment, token: int | None) -> LMStep:
        """Give the programme one sampled token (None: a step whose token the programme forces itself)."""
        program = segment.program

        def sampled(_logp, ignore_eos: bool) -> int:
            if token is None:
                raise LMProtocolError("internal: the programme wanted a sample where none was drawn")
            if ignore_eos and token == program.eos:
                raise SamplingError("the LM server sampled end-of-speech where it was masked")
            return token

        program._sample = sampled
        try:
            step = program.on_logprobs(None)
        finally:
            del program._sample
        segment.fed = False
        if step.tokens or step.done:
            self.post(segment, list(step.tokens), step.done)
        return step

    def spec(self, segment: Segment) -> SubRequest:
        program = segment.program
        eos = program.eos
        if isinstance(program, WholeTextProgram):
            remaining = program.max_len - program.steps
            mask_eos_steps = max(0, program.min_len - program.steps)
            stops = (eos, eos + 1, eos + 2)  # eos ends; a special token is answered by re-feeding (new request)
        elif program.final:
            remaining = program.max_tokens - len(program.decoded)
            mask_eos_steps = 0
            stops = (eos, eos + 1, eos + 2)
        else:
            if program.next_fill_index != -1:
                remaining = program.next_fill_index - len(program.decoded)  # then the fill is forced
            else:
                remaining = program.max_tokens - len(program.decoded)
            mask_eos_steps = -1  # never while text streams
            stops = (eos + 1, program.fill)
        room = self.max_context - segment.context_len
        if room <= 0:
            raise EngineError("context_full", "the request's context is full")
        remaining = min(max(1, remaining), room)
        ras = self.ras
        history = tuple(program.decoded[-ras.win_size:]) if ras.win_size > 0 else ()
        seed = program.generator.seed31()
        return SubRequest(remaining, stops, mask_eos_steps, eos, history, seed, ras)

    # --- the loop --------------------------------------------------------------------------------
    async def _wait_runnable(self, segment: Segment) -> None:
        program = segment.program
        while not program.done and not program.runnable():
            self.apply(segment, await segment.inbox.get())
            self.drain_inbox(segment)

    async def drive(self, segment: Segment) -> None:
        """Run the programme to its end. Raises EngineError / LMProtocolError / SamplingError on failure."""
        program = segment.program
        if segment.inbox is None:
            segment.inbox = asyncio.Queue()
        while True:
            self.drain_inbox(segment)
            await self._wait_runnable(segment)
            if program.done:
                break
            if not segment.fed:
                self.feed(segment)
            if forced_fill_due(program):
                self.step(segment, None)
                continue
            await self._generate(segment)
        self.post(segment, [], True)

    async def _generate(self, segment: Segment) -> None:
        """One server request from the whole context; returns when the programme needs another input."""
        program = segment.program
        spec = self.spec(segment)
        segment.subrequests += 1
        self.counters["vllm_subrequests"] += 1
        if segment.subrequests > 1:
            self.counters["vllm_restarts"] += 1
        context = [(kind, list(ids)) for kind, ids in segment.context]
        stream = self.client.generate(context, spec, f"{segment.request_id}-{next(_subrequest_ids)}")
        produced = 0
        try:
            async for tokens in stream:
                produced += len(tokens)
                self.counters["vllm_tokens"] += len(tokens)
                for token in tokens:
                    self.step(segment, int(token))
                    if program.done:
                        return
                    if not single_speech(program, int(token)):
                        return  # the programme wants another input: end this server request
                    self.feed(segment)  # the server feeds this token's speech embedding itself
                    if forced_fill_due(program):
                        return
                self.drain_inbox(segment)
        finally:
            await stream.aclose()  # aborts the server request if it is still running
        if produced == 0:
            raise EngineError("internal", "the LM server ended a request without sampling a token")
