"""Repetition-aware sampling (RAS), the sampler CosyVoice2 was trained to be decoded with.

Each request owns a seeded `TokenRng` (torch's CPU generator, drawn in numpy), so its tokens depend only on its own
seed and its own log-probabilities, never on which other requests share the batch. The operations and their order
match the reference (`nucleus_sampling`, `random_sampling`, `ras_sampling`, `sampling_ids`), so with the same seed
and the same log-probabilities the reference draws the same tokens from torch's global CPU RNG.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class SamplingError(RuntimeError):
    """The sampler could not produce an allowed token (reference: 'sampling reaches max_trials')."""


@dataclass(frozen=True)
class RasConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


class StepDistribution:
    """One request's log-probabilities for one step, with its top-k candidates when the runner computed them on
    the device for the whole batch (a single top-k there, instead of one per request on the CPU).

    The candidates are numpy views of the batch's host copy, and the draws come from `TokenRng`: a token costs no
    torch call (one softmax where RAS falls back to the whole distribution). That matters beyond the arithmetic:
    every torch call releases the GIL, and while the vocoder thread runs Python, taking it back can cost a whole
    switch interval."""

    def __init__(self, logp: torch.Tensor, top_probs: np.ndarray | torch.Tensor | None = None,
                 top_ids: np.ndarray | torch.Tensor | None = None):
        self.logp = logp  # [V] fp32, CPU
        self.top_probs = None if top_probs is None else np.asarray(top_probs, dtype=np.float32)
        self.top_ids = None if top_ids is None else np.asarray(top_ids)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely tokens' probabilities (descending, fp32) and ids."""
        if self.top_probs is not None and self.top_probs.shape[0] >= k:
            return self.top_probs[:k], self.top_ids[:k]
        probs, ids = self.logp.softmax(dim=0).topk(min(k, self.logp.numel()))
        return probs.numpy(), ids.numpy()


def as_distribution(logp: "torch.Tensor | StepDistribution") -> StepDistribution:
    return logp if isinstance(logp, StepDistribution) else StepDistribution(logp)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


_MT_WORDS = 624
_LOW_53_BITS = np.uint64((1 << 53) - 1)


def _mt19937_key(seed: int) -> np.ndarray:
    """The Mersenne Twister's state after `init_genrand(seed)`, the seeding of torch's CPU generator (`manual_seed`
    keeps the seed's low 32 bits)."""
    key = [int(seed) & 0xFFFFFFFF]
    for i in range(1, _MT_WORDS):
        previous = key[-1]
        key.append((1812433253 * (previous ^ (previous >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


class TokenRng:
    """A request's token-sampling random stream: the numbers of `torch.Generator().manual_seed(seed)`, drawn in
    numpy (numpy's MT19937 is torch's CPU engine, the same 32-bit words in the same order).

    Why not the torch generator itself: the sampler runs on the LM loop's thread, once per request and step, and
    every torch call releases the GIL, which the vocoder thread may then hold for a switch interval. On the H100
    host (docs/performance.md, run s2) 25 exponential draws beside a thread running Python cost 231 us through
    torch and 11 us here; 6564 of them alone 188 us through torch and 91 us here."""

    def __init__(self, seed: int):
        self._bits = np.random.MT19937(0)
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(seed), "pos": _MT_WORDS}}

    def exponential(self, count: int) -> np.ndarray:
        """`torch.empty(count).exponential_(1, generator=...)`: float32(-log1p(-u)) of float64 uniforms u, each
        the low 53 bits of two words (the first one high) times 2^-53."""
        words = self._bits.random_raw(2 * count)
        bits = ((words[0::2] << np.uint64(32)) | words[1::2]) & _LOW_53_BITS
        return (-np.log1p(-(bits * 2.0**-53))).astype(np.float32)

    def seed31(self) -> int:
        """A seed in [0, 2^31) for a sampler elsewhere (the vLLM backend's sub-requests), from the next word."""
        return int(self._bits.random_raw() >> 1)


def draw_one(probs: np.ndarray, rng: TokenRng) -> int:
    """`torch.multinomial(probs, 1, replacement=True, generator=generator)`, draw for draw: for one sample torch
    takes argmax(p / q) with q ~ Exp(1), one per category from the generator; the division (fp32) and the argmax
    (first maximum) are the same in numpy."""
    return int(np.argmax(probs / rng.exponential(probs.shape[0])))


def nucleus_sample(logp, cfg: RasConfig, rng: TokenRng) -> int:
    # Only the top_k most likely tokens can be kept, so a top-k selection stands in for the reference's full
    # stable sort (same order unless two probabilities are exactly equal) at a fraction of the cost.
    probs, order = as_distribution(logp).top(cfg.top_k)
    # Keep a token while the mass before it is under top_p (accumulated in fp32, in order, as the reference does):
    # up to and including the first whose running mass reaches top_p.
    mass = np.cumsum(probs, dtype=np.float32)
    kept = min(probs.shape[0], int(np.count_nonzero(mass < np.float32(cfg.top_p))) + 1)
    return int(order[draw_one(probs[:kept], rng)])


def random_sample(logp, rng: TokenRng) -> int:
    return draw_one(as_distribution(logp).logp.softmax(dim=0).numpy(), rng)


def ras_sample(logp: torch.Tensor, decoded: list[int], cfg: RasConfig, rng: TokenRng) -> int:
    token = nucleus_sample(logp, cfg, rng)
    window = decoded[-cfg.win_size:] if cfg.win_size > 0 else []
    repeats = sum(1 for t in window if t == token)
    if repeats >= cfg.win_size * cfg.tau_r:
        token = random_sample(logp, rng)
    return token


def sample_token(
    logp: torch.Tensor,
    decoded: list[int],
    cfg: RasConfig,
    rng: TokenRng,
    eos_token: int,
    ignore_eos: bool,
    max_trials: int = 100,
) -> int:
    """One token for one request; while `ignore_eos`, end-of-speech is redrawn (reference `sampling_ids`)."""
    trials = 0
    while True:
        token = ras_sample(logp, decoded, cfg, rng)
        if not ignore_eos or token != eos_token:
            return token
        trials += 1
        if trials > max_trials:
            raise SamplingError(f"sampling drew end-of-speech {max_trials} times while it was not allowed")
