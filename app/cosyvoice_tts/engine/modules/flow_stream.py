"""Bookkeeping for the flow's incremental streaming path.

In streaming mode every attention in the flow is chunk-causal (a frame sees nothing after the end of its
static chunk) and every convolution is causal apart from the encoder's 3-token lookahead. So once a stream
has produced the frames of whole chunks up to some boundary (`commit`), those frames -- and every
intermediate value that later frames read from them -- are final. Instead of re-running the whole prefix,
a call evaluates the frames from the last boundary on, reading:
  - per attention layer, the keys/values of the final frames;
  - per causal convolution, its last kernel_size-1 input frames before the boundary.
Frames after the boundary (a partial chunk) are evaluated again by the next call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .flow_masks import attention_mask
from . import pointwise


def join_history(previous: torch.Tensor | None, new: torch.Tensor, width: int, dim: int, start: int) -> torch.Tensor:
    """previous (the `width` frames before frame `start`, None at the sequence start: zeros, as the
    convolutions' padding) followed by new (frames from `start`), along `dim`."""
    if previous is None:
        if start != 0:
            raise RuntimeError("incremental evaluation resumed without the cached frames")
        shape = list(new.shape)
        shape[dim] = width
        previous = new.new_zeros(shape)
    return torch.cat([previous, new], dim=dim)


def frames_before(joined: torch.Tensor, width: int, dim: int, start: int, commit: int) -> torch.Tensor:
    """From `join_history`'s result (which begins at frame start - width): the `width` frames before
    `commit`, i.e. what the next call, starting at `commit`, needs as history."""
    return joined.narrow(dim, commit - start, width).clone()


@dataclass
class FrameWindow:
    """One incremental evaluation of the estimator: its input holds frames start..start+T-1; frames before
    `commit` are final after this call. `memory` maps each module to what it keeps about final frames; one
    dict per stream and Euler step."""

    start: int
    commit: int
    memory: dict = field(default_factory=dict)

    def conv_input(self, module: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        """x [B, C, T] with the module's `width` cached input frames in front; caches the new ones."""
        joined = join_history(self.memory.get(module), x, width, dim=2, start=self.start)
        self.memory[module] = frames_before(joined, width, 2, self.start, self.commit)
        return joined

    def attention_bias(self, mask: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive self-attention mask [B, T, start+T] of the window's frames (mask [B, 1, T]: all real)
        over every frame so far, by the static-chunk rule."""
        batch, frames = mask.shape[0], mask.shape[2]
        keys = torch.ones(batch, self.start + frames, dtype=torch.bool, device=mask.device)
        streaming = torch.ones(batch, dtype=torch.bool, device=mask.device)
        return pointwise.additive_mask(attention_mask(keys, streaming, chunk, query_start=self.start), dtype)

    def attention_keys_values(self, module: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """New keys/values [B, H, T, d] -> those of all frames so far; caches the final ones."""
        past = self.memory.get(module)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        elif self.start != 0:
            raise RuntimeError("incremental evaluation resumed without the cached keys/values")
        self.memory[module] = (k[:, :, :self.commit].clone(), v[:, :, :self.commit].clone())
        return k, v
