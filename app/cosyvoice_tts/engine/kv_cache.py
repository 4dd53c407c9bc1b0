"""Preallocated KV memory: one fixed-length slot per concurrent request.

Sized once from `max_sessions` and the longest context a request may reach, so load can never grow GPU memory:
past `max_sessions`, requests are refused before they take anything.
"""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """A request's context would exceed its slot."""


class MemoryBudgetError(RuntimeError):
    """The configured sessions and context do not fit the GPU memory the worker may use."""


def kv_cache_bytes(num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """What `KVCache` allocates for these settings (keys and values, every layer, the scratch slot included)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers * (num_slots + 1) * max_len * kv_heads * head_dim * itemsize


def ensure_kv_fits(needed: int, in_use: int, budget: int, sessions: int, context: int, fraction: float) -> None:
    """Refuse to start, saying what to change, when the KV cache cannot fit next to what is already loaded."""
    if in_use + needed <= budget:
        return
    gib = 2 ** 30
    raise MemoryBudgetError(
        f"the KV cache for {sessions} sessions x {context} tokens needs {needed / gib:.2f} GiB, but only "
        f"{max(0, budget - in_use) / gib:.2f} GiB of the GPU memory fraction {fraction:g} ({budget / gib:.1f} GiB) "
        f"is left after the model weights: lower --max-sessions or --max-context, or raise --gpu-memory-fraction")


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # One extra scratch slot: padded rows of a fixed-shape batch write there, never into a live request.
        shape = (num_slots + 1, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch_slot = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
