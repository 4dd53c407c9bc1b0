"""Repetition-aware sampling (RAS), the sampler CosyVoice2 was trained to be decoded with.

Each request owns a seeded CPU `torch.Generator`, so its tokens depend only on its own seed and its own
log-probabilities, never on which other requests share the batch. The operations and their order match the
reference (`nucleus_sampling`, `random_sampling`, `ras_sampling`, `sampling_ids`), so with the same seed and the
same log-probabilities the reference draws the same tokens from the global RNG.
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

    The candidates are numpy views of the batch's host copy: the per-request sampling below then makes one torch
    call per token, not seven. That matters beyond the arithmetic: every torch call releases the GIL, and while
    the vocoder thread runs Python, taking it back can cost a whole switch interval."""

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


def draw_one(probs: np.ndarray, generator: torch.Generator) -> int:
    """`torch.multinomial(probs, 1, replacement=True, generator=generator)`, draw for draw: for one sample torch
    takes argmax(p / q) with q ~ Exp(1), one per category from the generator. Only the draws are a torch call;
    the division (fp32) and the argmax (first maximum) are the same in numpy."""
    q = torch.empty(probs.shape[0], dtype=torch.float32).exponential_(1, generator=generator).numpy()
    return int(np.argmax(probs / q))


def nucleus_sample(logp, cfg: RasConfig, generator: torch.Generator) -> int:
    # Only the top_k most likely tokens can be kept, so a top-k selection stands in for the reference's full
    # stable sort (same order unless two probabilities are exactly equal) at a fraction of the cost.
    probs, order = as_distribution(logp).top(cfg.top_k)
    # Keep a token while the mass before it is under top_p (accumulated in fp32, in order, as the reference does):
    # up to and including the first whose running mass reaches top_p.
    mass = np.cumsum(probs, dtype=np.float32)
    kept = min(probs.shape[0], int(np.count_nonzero(mass < np.float32(cfg.top_p))) + 1)
    return int(order[draw_one(probs[:kept], generator)])


def random_sample(logp, generator: torch.Generator) -> int:
    return draw_one(as_distribution(logp).logp.softmax(dim=0).numpy(), generator)


def ras_sample(logp: torch.Tensor, decoded: list[int], cfg: RasConfig, generator: torch.Generator) -> int:
    token = nucleus_sample(logp, cfg, generator)
    window = decoded[-cfg.win_size:] if cfg.win_size > 0 else []
    repeats = sum(1 for t in window if t == token)
    if repeats >= cfg.win_size * cfg.tau_r:
        token = random_sample(logp, generator)
    return token


def sample_token(
    logp: torch.Tensor,
    decoded: list[int],
    cfg: RasConfig,
    generator: torch.Generator,
    eos_token: int,
    ignore_eos: bool,
    max_trials: int = 100,
) -> int:
    """One token for one request; while `ignore_eos`, end-of-speech is redrawn (reference `sampling_ids`)."""
    trials = 0
    while True:
        token = ras_sample(logp, decoded, cfg, generator)
        if not ignore_eos or token != eos_token:
            return token
        trials += 1
        if trials > max_trials:
            raise SamplingError(f"sampling drew end-of-speech {max_trials} times while it was not allowed")
