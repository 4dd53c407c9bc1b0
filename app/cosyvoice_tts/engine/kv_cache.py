"""Preallocated KV memory: one fixed-length slot per concurrent request.

Sized once from `max_sessions` and the longest context a request may reach, so load can never grow GPU memory:
past `max_sessions`, requests are refused before they take anything.
"""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """A request's context would exceed its slot."""


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
