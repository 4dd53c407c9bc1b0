"""Attention masks of the flow stage (encoder and estimator).

Every mask here is boolean, True where a query may attend to a key. Sequences in a batch are left-aligned
and padded on the right, so padding only ever has to be hidden as a *key*; padded query rows compute
garbage that the callers never read.

Streaming mode restricts attention to "static chunks": the query at absolute position i sees every key
before the end of its own chunk, ``j < (i // chunk + 1) * chunk`` (all earlier chunks, no limit to the
left). Because this depends only on absolute positions, an output inside a complete chunk never changes
when more frames are appended -- the property the incremental streaming path relies on.
"""
from __future__ import annotations

import torch

from ..host_copy import to_device


def lengths_to_valid(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True at the real (non-padded) positions."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def per_request_flags(flag: bool | torch.Tensor | list | tuple, batch: int, device: torch.device) -> torch.Tensor:
    """A bool or one bool per request -> [B] bool tensor."""
    if isinstance(flag, torch.Tensor):
        flags = flag.to(device=device, dtype=torch.bool).reshape(-1)
    elif isinstance(flag, (list, tuple)):
        flags = to_device([bool(f) for f in flag], device, torch.bool)
    else:
        flags = torch.full((batch,), bool(flag), dtype=torch.bool, device=device)
    if flags.numel() != batch:
        raise ValueError(f"expected one flag per request ({batch}), got {flags.numel()}")
    return flags


def chunk_visibility(query_positions: torch.Tensor, key_count: int, chunk_size: int) -> torch.Tensor:
    """[Tq] absolute query positions -> [Tq, key_count] bool: which keys (positions 0..key_count-1) the
    static-chunk rule lets each query see. chunk_size <= 0 means no chunking (everything visible)."""
    keys = torch.arange(key_count, device=query_positions.device)
    if chunk_size <= 0:
        return torch.ones(query_positions.numel(), key_count, dtype=torch.bool, device=query_positions.device)
    chunk_end = (torch.div(query_positions, chunk_size, rounding_mode="floor") + 1) * chunk_size
    return keys.unsqueeze(0) < chunk_end.unsqueeze(1)


def attention_mask(
    key_valid: torch.Tensor,
    streaming: torch.Tensor,
    chunk_size: int,
    query_start: int = 0,
    query_count: int | None = None,
) -> torch.Tensor:
    """Self-attention mask [B, Tq, Tk] for keys at absolute positions 0..Tk-1 and queries at
    query_start..query_start+Tq-1.

    key_valid: [B, Tk] bool (padding hidden); streaming: [B] bool, chunk rule applied where True.
    """
    batch, key_count = key_valid.shape
    if query_count is None:
        query_count = key_count - query_start
    queries = torch.arange(query_start, query_start + query_count, device=key_valid.device)
    chunked = chunk_visibility(queries, key_count, chunk_size)  # [Tq, Tk]
    # Non-streaming requests see every valid key; streaming ones only what their chunk allows.
    visible = chunked.unsqueeze(0) | ~streaming.view(batch, 1, 1)
    return visible & key_valid.unsqueeze(1)
