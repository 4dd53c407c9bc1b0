"""The per-token draw without torch calls (TokenRng, numpy) must stay torch.multinomial with torch's CPU generator of
the same seed, draw for draw."""
from __future__ import annotations

import numpy as np
import torch

from cosyvoice_tts.engine.sampling import (RasConfig, StepDistribution, TokenRng, draw_one, make_generator,
                                          nucleus_sample)


def test_draw_one_is_torch_multinomial_draw_for_draw():
    shapes = torch.Generator().manual_seed(1)
    for seed in range(300):
        n = int(torch.randint(1, 30, (1,), generator=shapes))
        probs = torch.rand(n, generator=shapes).pow(4)
        probs = probs / probs.sum()
        ours, theirs = TokenRng(seed), make_generator(seed)
        for _ in range(4):  # consecutive draws too: the generator must advance the same way
            assert draw_one(probs.numpy(), ours) == int(probs.multinomial(1, replacement=True, generator=theirs))


def test_nucleus_sample_keeps_the_reference_rule():
    """Top-k candidates, then tokens while the mass before them is under top_p, drawn as torch.multinomial."""
    cfg = RasConfig(top_p=0.8, top_k=25)
    logits = torch.randn(6564, generator=torch.Generator().manual_seed(3)) * 4
    logp = logits.log_softmax(0)
    probs, ids = logp.softmax(0).topk(32)
    dist = StepDistribution(logp, probs.numpy(), ids.numpy())
    sorted_probs = probs[:25]
    kept, mass = 0, 0.0
    for p in sorted_probs.tolist():  # the reference's loop, in fp32
        if np.float32(mass) >= np.float32(0.8):
            break
        mass = float(np.float32(mass) + np.float32(p))
        kept += 1
    for seed in range(50):
        reference = make_generator(seed)
        expected = int(ids[int(sorted_probs[:kept].multinomial(1, replacement=True, generator=reference))])
        assert nucleus_sample(dist, cfg, TokenRng(seed)) == expected
    # Without the device's candidates (a bare log-prob row) the same token comes out.
    assert nucleus_sample(logp, cfg, TokenRng(7)) == nucleus_sample(dist, cfg, TokenRng(7))


def test_random_sample_is_torch_multinomial_over_the_whole_distribution():
    from cosyvoice_tts.engine.sampling import random_sample

    logp = (torch.randn(6564, generator=torch.Generator().manual_seed(5)) * 3).log_softmax(0)
    for seed in range(30):
        expected = int(logp.softmax(0).multinomial(1, replacement=True, generator=make_generator(seed)))
        assert random_sample(logp, TokenRng(seed)) == expected


def test_token_rng_draws_the_numbers_of_torchs_cpu_generator():
    """Exponentials of any count, one call after another, are those of `exponential_` with a torch generator of
    the same seed (seeds past 32 bits keep their low 32, as manual_seed does)."""
    counts = [1, 25, 3, 6564, 17, 2, 6564, 200]
    for seed in (0, 1, 7, 12345, 2**31 - 1, 2**32 + 5):
        ours, theirs = TokenRng(seed), make_generator(seed)
        for count in counts:
            expected = torch.empty(count, dtype=torch.float32).exponential_(1, generator=theirs).numpy()
            np.testing.assert_array_equal(ours.exponential(count), expected)


def test_token_rng_seeds_differ_and_advance():
    first, second = TokenRng(3), TokenRng(3)
    assert first.seed31() == second.seed31() and 0 <= first.seed31() < 2**31
    assert not np.array_equal(first.exponential(8), TokenRng(4).exponential(8))
