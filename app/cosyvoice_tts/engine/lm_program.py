"""What one request feeds the speech-token LM at each step, and what it does with each sampled token.

This is the reference decoding programme (`Qwen2LM.inference` and `inference_bistream`) turned inside out: the
reference runs a loop per request; here the engine asks every request for its next input, runs them all in one
batched forward, and hands each its log-probabilities. The reference's quirks are kept on purpose, because the
model was used with them: a skipped special token re-feeds the previous input, a fill token is not fed back,
and the final bistream step re-feeds an input the cache already holds.

Inputs are described as pieces (kind, token ids) and embedded by the model runner, so a plain decode step is one
speech token per request and can go through the captured fixed-shape step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import RasConfig, SamplingError, TokenRng, sample_token

# A piece of LM input: ("sos", []), ("task", []), ("text", ids) or ("speech", ids).
Piece = tuple[str, list[int]]


class LMProtocolError(RuntimeError):
    """The model produced a token the decoding programme does not allow at that point."""


@dataclass
class LMStep:
    """Outcome of one sampled step: speech tokens to pass to the vocoder side, and whether the LM is done."""

    tokens: list[int] = field(default_factory=list)
    done: bool = False


def pieces_length(pieces: list[Piece]) -> int:
    return sum(1 if kind in ("sos", "task") else len(ids) for kind, ids in pieces)


class LMProgram:
    """Common state: the pending input, the decoded tokens and the sampler."""

    def __init__(self, speech_token_size: int, ras: RasConfig, generator: TokenRng, max_tokens: int):
        self.eos = speech_token_size
        self.fill = speech_token_size + 2
        self.ras = ras
        self.generator = generator
        self.max_tokens = max_tokens
        self.lm_input: list[Piece] = []
        self.consumed = True  # whether the cache already holds lm_input
        self.decoded: list[int] = []  # every sampled token, fill tokens included (they count for RAS)
        self.done = False

    # --- what the engine asks -------------------------------------------------
    def runnable(self) -> bool:
        raise NotImplementedError

    def take_input(self) -> list[Piece]:
        self.consumed = True
        return self.lm_input

    def on_logprobs(self, logp: torch.Tensor) -> LMStep:
        raise NotImplementedError

    def push_text(self, token_ids: list[int]) -> None:
        raise LMProtocolError("this request was given its whole text already")

    def end_text(self) -> None:
        pass

    def _sample(self, logp: torch.Tensor, ignore_eos: bool) -> int:
        return sample_token(logp, self.decoded, self.ras, self.generator, self.eos, ignore_eos)


class WholeTextProgram(LMProgram):
    """`Qwen2LM.inference`: the whole text is known; output length within [min_ratio, max_ratio] x text tokens."""

    def __init__(
        self,
        text: list[int],
        prompt_text: list[int],
        prompt_speech: list[int],
        speech_token_size: int,
        ras: RasConfig,
        generator: TokenRng,
        min_ratio: float = 2,
        max_ratio: float = 20,
    ):
        max_len = int(len(text) * max_ratio)
        super().__init__(speech_token_size, ras, generator, max_len)
        self.min_len = int(len(text) * min_ratio)
        self.max_len = max_len
        self.steps = 0
        self.emitted: list[int] = []
        self.lm_input = [("sos", []), ("text", list(prompt_text) + list(text)), ("task", [])]
        if prompt_speech:
            self.lm_input.append(("speech", list(prompt_speech)))
        self.consumed = False
        if self.max_len <= 0:
            self.done = True

    def runnable(self) -> bool:
        return not self.done

    def on_logprobs(self, logp: torch.Tensor) -> LMStep:
        token = self._sample(logp, ignore_eos=self.steps < self.min_len)
        self.steps += 1
        step = LMStep()
        if token == self.eos:
            self.done = True
        elif token > self.eos:
            self.consumed = False  # reference `continue`: the same input goes in again
        else:
            step.tokens.append(token)
            self.decoded.append(token)
            self.lm_input = [("speech", [token])]
            self.consumed = False
        if self.steps >= self.max_len:
            self.done = True
        step.done = self.done
        return step


class BistreamProgram(LMProgram):
    """`Qwen2LM.inference_bistream`: text arrives in fragments; text and speech interleave 5:15 (mix_ratio)."""

    def __init__(
        self,
        prompt_text: list[int],
        prompt_speech: list[int],
        speech_token_size: int,
        ras: RasConfig,
        generator: TokenRng,
        mix_ratio: tuple[int, int] = (5, 15),
        max_ratio: float = 20,
        min_token_budget: int = 200,
    ):
        super().__init__(speech_token_size, ras, generator, max_tokens=min_token_budget)
        self.text_step, self.speech_step = mix_ratio
        self.max_ratio = max_ratio
        self.text_cache: list[int] = list(prompt_text)
        self.prompt_speech: list[int] = list(prompt_speech)
        self.text_seen = 0
        self.next_fill_index = -1
        self.text_ended = False
        self.final = False
        self.waiting = True
        self.lm_input = [("sos", [])]
        self.consumed = False
        self._advance()

    def runnable(self) -> bool:
        return not self.done and not self.waiting

    def push_text(self, token_ids: list[int]) -> None:
        if self.text_ended:
            raise LMProtocolError("text pushed after end of text")
        self.text_cache.extend(token_ids)
        self.text_seen += len(token_ids)
        # Long streams get a proportional budget; the reference has none, an unbounded loop is not an option.
        self.max_tokens = max(self.max_tokens, int(self.text_seen * self.max_ratio))
        if self.waiting and not self.final:
            self._advance()

    def end_text(self) -> None:
        self.text_ended = True
        if self.waiting and not self.final:
            self._advance()

    def _needs_text(self) -> bool:
        last_was_fill = bool(self.decoded) and self.decoded[-1] == self.fill
        only_sos = not self.decoded and pieces_length(self.lm_input) == 1
        return last_was_fill or only_sos

    def _advance(self) -> None:
        """Decide whether the request can decode now (the body of the reference's per-token text loop)."""
        while self.prompt_speech and len(self.text_cache) >= self.text_step:
            self.lm_input = self.lm_input + [
                ("text", self.text_cache[: self.text_step]),
                ("speech", self.prompt_speech[: self.speech_step]),
            ]
            self.consumed = False
            self.text_cache = self.text_cache[self.text_step:]
            self.prompt_speech = self.prompt_speech[self.speech_step:]
        self.waiting = True
        if not self.prompt_speech:
            if not self._needs_text():
                self.waiting = False
            elif len(self.text_cache) >= self.text_step:
                text_piece = ("text", self.text_cache[: self.text_step])
                if self.decoded and self.decoded[-1] == self.fill:
                    self.lm_input = [text_piece]
                else:
                    self.lm_input = self.lm_input + [text_piece]
                self.consumed = False
                self.text_cache = self.text_cache[self.text_step:]
                self.waiting = False
        if self.waiting and self.text_ended:
            self._start_final()

    def _start_final(self) -> None:
        # Remaining prompt speech is dropped and the last input is fed again, exactly as the reference does.
        self.final = True
        self.waiting = False
        tail: list[Piece] = [("text", self.text_cache)] if self.text_cache else []
        self.lm_input = self.lm_input + tail + [("task", [])]
        self.text_cache = []
        self.consumed = False

    def on_logprobs(self, logp: torch.Tensor) -> LMStep:
        step = LMStep()
        if self.final:
            token = self._sample(logp, ignore_eos=False)
            self.decoded.append(token)
            if token == self.eos:
                self.done = True
            elif token > self.eos:
                raise LMProtocolError(f"the model produced special token {token} after the end of text")
            else:
                step.tokens.append(token)
                self.lm_input = [("speech", [token])]
                self.consumed = False
        else:
            if self.next_fill_index != -1 and len(self.decoded) == self.next_fill_index:
                token = self.fill
            else:
                token = self._sample(logp, ignore_eos=True)
            if token == self.fill:
                self.next_fill_index = len(self.decoded) + self.speech_step + 1
            self.decoded.append(token)
            if token == self.fill:
                self._advance()
            elif token >= self.eos:
                raise LMProtocolError(f"the model produced token {token} while text was still streaming")
            else:
                step.tokens.append(token)
                self.lm_input = [("speech", [token])]
                self.consumed = False
        if len(self.decoded) >= self.max_tokens and not self.done:
            if not self.text_ended:
                raise SamplingError(f"no end of speech after {len(self.decoded)} tokens")
            self.done = True
        step.done = self.done
        return step
