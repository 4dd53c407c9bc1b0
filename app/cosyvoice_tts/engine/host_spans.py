"""Named ranges of the engine's host work, for a profiler's trace (bench_engine --profile-level).

Off (the default) a span is a `nullcontext`: a profiler range costs a dispatcher call even with no profiler
running, and the engine's loop opens several per step.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

_enabled = False


def enable(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def span(name: str):
    return torch.profiler.record_function(name) if _enabled else nullcontext()
