"""Repetition-aware sampling (RAS) as a distribution, so a sampler that draws from logits can run it.

The reference (`engine.sampling.ras_sample`, upstream `ras_sampling`) draws in two stages: a nucleus draw
(top_p, top_k over the probabilities sorted in descending order), and, when the drawn token already occurs at
least `win_size * tau_r` times among the last `win_size` decoded tokens, a second draw from the full distribution.
The token that comes out has the distribution

    q(t) = Pn(t) * [t not in R]  +  (sum over s in R of Pn(s)) * p(t)

where p = softmax(logits), Pn is p restricted to the nucleus and renormalised, and R is the set of tokens that
occur at least `win_size * tau_r` times in the window. While end-of-speech is not allowed the reference redraws the
whole RAS until it is not eos; that is q conditioned on t != eos, i.e. q with eos removed and renormalised.

`ras_logprobs` returns log q for a batch of rows, so a sampler that draws from softmax(logits) with temperature 1
and no top-k/top-p (vLLM's, after a logits processor) draws exactly RAS's distribution. It does not reproduce the
reference's random stream: same seed, same distribution, other draws.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def ras_logprobs(
    logits: torch.Tensor,
    windows: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    threshold: torch.Tensor,
    mask_eos: torch.Tensor,
    eos: torch.Tensor,
) -> torch.Tensor:
    """log q for each row.

    logits [B, V] (any float dtype; computed in fp32); windows [B, W] long, the last decoded tokens of each row
    padded with -1; top_k [B] long; top_p [B] float; threshold [B] float (= win_size * tau_r); mask_eos [B] bool;
    eos [B] long. Returns [B, V] float32 log-probabilities (-inf where q is 0).
    """
    logits = logits.float()
    batch, vocab = logits.shape
    p = torch.softmax(logits, dim=-1)
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    keep = (rank < top_k.unsqueeze(1)) & (mass_before < top_p.unsqueeze(1))
    keep[:, 0] = True  # the reference always keeps the most probable token (mass 0 < top_p)
    nucleus_sorted = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    nucleus_sorted = nucleus_sorted / nucleus_sorted.sum(dim=-1, keepdim=True)
    nucleus = torch.zeros_like(p).scatter_(1, order, nucleus_sorted)

    counts = torch.zeros(batch, vocab + 1, device=logits.device, dtype=torch.float32)
    if windows.numel():
        idx = torch.where(windows < 0, torch.full_like(windows, vocab), windows)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    repeated = counts[:, :vocab] >= threshold.unsqueeze(1)
    redraw = (nucleus * repeated).sum(dim=-1, keepdim=True)
    q = nucleus * (~repeated) + redraw * p

    if bool(mask_eos.any()):
        rows = mask_eos.nonzero(as_tuple=True)[0]
        q[rows, eos[rows]] = 0.0
        total = q.sum(dim=-1, keepdim=True)
        # Reference: 100 redraws of eos and it gives up. Here a row left with no mass falls back to p without eos.
        empty = total.squeeze(1) <= 0
        if bool(empty.any()):
            fallback = p[empty].clone()
            fallback[torch.arange(fallback.shape[0], device=p.device), eos[empty]] = 0.0
            q[empty] = fallback
    q = q / q.sum(dim=-1, keepdim=True)
    return torch.where(q > 0, q.log(), torch.full_like(q, NEG_INF))


def window_tensor(histories: list[list[int]], win_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The last win_size tokens of each history, right-aligned, padded with -1 -> [B, win_size] long."""
    width = max(win_size, 0)
    rows = []
    for history in histories:
        # vLLM may hold -1 placeholders for tokens still in flight; they are not tokens
        tail = [t for t in history[-(width + 4):] if t >= 0][-width:] if width else []
        rows.append([-1] * (width - len(tail)) + tail)
    if not rows:
        return torch.zeros(0, width, dtype=torch.long, device=device)
    return torch.tensor(rows, dtype=torch.long, device=device)
