"""Incremental streaming for a batch of streams at different positions: the estimator's memory in pages.

`FrameWindow` (flow_stream.py) keeps one stream's memory in tensors of its own, so streams cannot share a call.
Here every stream's memory lives in tensors allocated once, and one fixed-shape (CUDA-graph) estimator call serves
streams whose pasts differ in length:
  - the keys/values of each attention layer's final frames, per Euler step, in pages of `page_frames` frames: one
    page per stream, guidance branch and committed chunk;
  - each causal convolution's last kernel_size-1 input frames before the stream's boundary, per Euler step, in one
    slot per stream and guidance branch.
A call has 2B rows (B conditioned, then the same B unconditioned, as the guided sampler stacks them). Row r writes
its window's keys/values in pages: the chunks that become final to the pages of its row of `write`, the others (in
a call with a past) to window pages; then one gather per layer reads its past pages (its row of `read`) and its
window pages together. It keeps its convolution history in `slots[r]`. Page 0 (of each layer, kind and step) and
slot 0 are scratch: padding points there, and what is read from them is masked out.

Exactness: the same argument as flow_stream.py. A stream's frames before its boundary are final, so the keys and
values read here are the ones a re-run of the whole prefix would compute, and the new frames attend exactly to what
they would see in that re-run (static chunks start at page boundaries).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..host_copy import to_device
from .flow_estimator import CausalConv1d, CausalConditionalDecoder, SelfAttention
from . import pointwise


class EstimatorMemory:
    """The preallocated pages and slots (see the module docstring) of one estimator.

    All pages live in one tensor, `kv` [pages in all, page_frames, heads * head_dim], so that one gather serves
    keys and values together: page p of layer l, kind k (0 keys, 1 values) and Euler step s is at index
    ((l * 2 + k) * steps + s) * pages + p. After those blocks come the window pages: 2 x window_rows x
    window_pages pages where a call with a past puts its rows' not-yet-final chunks, so that past and window come
    out of the same gather (no concatenation)."""

    def __init__(self, estimator: CausalConditionalDecoder, n_timesteps: int, pages: int, slots: int,
                 page_frames: int, dtype: torch.dtype, device: torch.device, window_rows: int = 0,
                 window_pages: int = 0):
        if page_frames % estimator.static_chunk_size:
            raise ValueError("pages must hold whole static chunks of the estimator")
        if pages < 2 or slots < 2:
            raise ValueError("the estimator memory needs at least one page and one slot besides the scratch ones")
        layers = [m for m in estimator.modules() if isinstance(m, SelfAttention)]
        convs = [m for m in estimator.modules() if isinstance(m, CausalConv1d)]
        self.layer_index = {module: i for i, module in enumerate(layers)}
        self.conv_index = {module: i for i, module in enumerate(convs)}
        self.layers = len(layers)
        self.heads, self.head_dim = layers[0].heads, layers[0].dim_head
        self.steps, self.pages, self.slots, self.page_frames = n_timesteps, pages, slots, page_frames
        self.block = n_timesteps * pages  # pages of one layer and kind
        self.window_rows, self.window_pages = window_rows, window_pages
        self.window_base = self.layers * 2 * self.block
        self.dtype = dtype
        # Zeros, not empty: scratch pages are masked out, but a NaN in uninitialised memory would survive the mask.
        self.kv = torch.zeros(self.window_base + 2 * window_rows * window_pages, page_frames,
                              self.heads * self.head_dim, dtype=dtype, device=device)
        # fp32: most convolutions get fp32 input (norm outputs), so no casts; the half ones round-trip exactly.
        self.history = [torch.zeros(n_timesteps * slots, conv.in_channels, conv.left_context, dtype=torch.float32,
                                    device=device) for conv in convs]

    def clear_slots(self, slots: list[int]) -> None:
        """Zero the convolution history of `slots` in every step: a new stream's frames before its start are the
        convolutions' zero padding."""
        index = to_device(slots, self.history[0].device, torch.long)  # one copy for every history
        for history in self.history:
            history.view(self.steps, self.slots, *history.shape[1:]).index_fill_(1, index, 0)

    @staticmethod
    def page_bytes(estimator: CausalConditionalDecoder, n_timesteps: int, page_frames: int,
                   dtype: torch.dtype) -> int:
        """Bytes of one page across all layers and Euler steps (keys and values)."""
        layers = [m for m in estimator.modules() if isinstance(m, SelfAttention)]
        width = layers[0].heads * layers[0].dim_head
        return len(layers) * 2 * n_timesteps * page_frames * width * torch.empty((), dtype=dtype).element_size()


@dataclass
class PagedTables:
    """Where each of a call's 2B rows keeps its memory, and how far it goes (all on the device)."""

    read: torch.Tensor  # [R, P] long: pages of the frames before the window (P = most past pages in the call)
    write: torch.Tensor  # [R, W] long: pages for the window's whole chunks that become final (W = T / page_frames)
    slots: torch.Tensor  # [R] long: convolution history slot
    advance: torch.Tensor  # [R] long: frames from the window's start to the row's new boundary
    past: torch.Tensor  # [R] long: frames before the window
    length: torch.Tensor  # [R] long: real frames in the window


class PagedWindow:
    """The estimator's view of one Euler step of a paged call: the `FrameWindow` interface over `EstimatorMemory`.
    `step` is a [1] long tensor, so that one captured graph serves every step."""

    def __init__(self, memory: EstimatorMemory, tables: PagedTables, step: torch.Tensor):
        self.memory = memory
        self.tables = tables
        self.slots = tables.slots + step * memory.slots
        self._history_frames: dict[int, torch.Tensor] = {}
        rows, past_pages, window_pages = tables.slots.shape[0], tables.read.shape[1], tables.write.shape[1]
        device = step.device
        # Page indices of every layer at once ([layers, 2 kinds, R, pages]): one kernel per step, a view per layer.
        blocks = (torch.arange(memory.layers * 2, device=device) * memory.block).view(memory.layers, 2, 1, 1)
        step_pages = step * memory.pages
        write = tables.write.unsqueeze(0).unsqueeze(0) + step_pages + blocks
        if past_pages:
            if window_pages > memory.window_pages or rows > memory.window_rows:
                raise ValueError("a call with a past is wider than the memory's window pages")
            # Chunks that do not become final go to the window pages, so that the gather finds them after the past.
            page = torch.arange(window_pages, device=device)
            final = page.view(1, -1) < torch.div(tables.advance, memory.page_frames, rounding_mode="floor").view(-1, 1)
            kinds = torch.arange(2, device=device).view(2, 1, 1)
            window = memory.window_base + (kinds * memory.window_rows
                                           + torch.arange(rows, device=device).view(1, -1, 1)) * memory.window_pages
            write = torch.where(final, write, window + page)
            read = tables.read.unsqueeze(0).unsqueeze(0) + step_pages + blocks
            self.read = torch.cat([read, write], dim=3)
        self.write = write

    def attention_bias(self, mask: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        """[R, T, P*page_frames + T] additive mask: every real past frame, then the window's frames by the
        static-chunk rule (windows start on chunk boundaries) up to the row's length."""
        tables, frames = self.tables, mask.shape[2]
        device = mask.device
        past_keys = torch.arange(tables.read.shape[1] * self.memory.page_frames, device=device)
        past_visible = (past_keys.unsqueeze(0) < tables.past.unsqueeze(1)).unsqueeze(1)
        positions = torch.arange(frames, device=device)
        chunk_end = (torch.div(positions, chunk, rounding_mode="floor") + 1) * chunk
        new_visible = (positions.unsqueeze(0) < chunk_end.unsqueeze(1)).unsqueeze(0) \
            & (positions.view(1, 1, -1) < tables.length.view(-1, 1, 1))
        return pointwise.additive_mask(torch.cat([past_visible.expand(-1, frames, -1), new_visible], dim=2), dtype)

    def conv_input(self, module: torch.nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        """x [R, C, T] with each row's `width` history frames in front; keeps those before its new boundary."""
        history = self.memory.history[self.memory.conv_index[module]]
        joined = torch.cat([history.index_select(0, self.slots).to(x.dtype), x], dim=2)
        kept = joined.gather(2, self._kept_frames(width).expand(-1, joined.shape[1], -1))
        history.index_copy_(0, self.slots, kept.to(history.dtype))
        return joined

    def _kept_frames(self, width: int) -> torch.Tensor:
        """[R, 1, width]: where in a joined convolution input (whose index i is frame start - width + i) the
        `width` frames before each row's new boundary lie; the same for every convolution of the call."""
        if width not in self._history_frames:
            offsets = torch.arange(width, device=self.tables.advance.device).view(1, 1, -1)
            self._history_frames[width] = self.tables.advance.view(-1, 1, 1) + offsets
        return self._history_frames[width]

    def attention_keys_values(self, module: torch.nn.Module, k: torch.Tensor, v: torch.Tensor):
        """New keys/values [R, H, T, d] -> those of the row's past pages followed by them. The window's chunks
        that become final go to the row's pages, the others (with a past) to its window pages."""
        memory = self.memory
        layer = memory.layer_index[module]
        rows, heads, frames, dim = k.shape
        page = memory.page_frames
        joint = _keys_and_values(k.transpose(1, 2), v.transpose(1, 2))  # [R, T, 2, H * d]
        # [2, R, W, page, H * d], a view of the new frames: no copy before the scatter.
        pages = joint.view(rows, frames // page, page, 2, heads * dim).permute(3, 0, 1, 2, 4)
        memory.kv.index_put_((self.write[layer],), pages)
        if not self.tables.read.shape[1]:
            return k, v
        both = memory.kv.index_select(0, self.read[layer].reshape(-1)).view(2, rows, -1, heads, dim)
        return both[0].transpose(1, 2), both[1].transpose(1, 2)


def _keys_and_values(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v [R, T, H, d] -> [R, T, 2, H * d]. The fused q/k/v projection leaves v right after k in one
    buffer: then this is a view of it, else a stacked copy."""
    rows, frames, heads, dim = k.shape
    width = heads * dim
    if (v.data_ptr() == k.data_ptr() + width * k.element_size() and k.stride() == v.stride()
            and k.stride(3) == 1 and k.stride(2) == dim):
        return k.as_strided((rows, frames, 2, width), (k.stride(0), k.stride(1), width, 1))
    return torch.stack([k.reshape(rows, frames, width), v.reshape(rows, frames, width)], dim=2)


def paged_euler_step(cfm, x, mu, mask, spks, cond, t_all, dt_all, step, memory: EstimatorMemory,
                     tables: PagedTables) -> torch.Tensor:
    """One guided Euler step (`step` [1] long indexes the sampler's times, see flow_cfm.euler_times) of B streams
    in a paged call: x, mu, cond [B, 80, T], mask [B, 1, T], spks [B, 80]. Returns the next x."""
    t = t_all.index_select(0, step)
    dt = dt_all.index_select(0, step)
    velocity = cfm.guided_velocity(x, mask, mu, t, spks, cond, True, PagedWindow(memory, tables, step))
    return x + dt * velocity
