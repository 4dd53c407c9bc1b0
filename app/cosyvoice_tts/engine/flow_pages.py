"""The batched incremental flow sampler: streams keep their estimator memory in pages between chunks.

Upstream re-runs the flow over a stream's whole prefix at every chunk (O(n^2) in the utterance). Here a streaming
request's chunk runs the sampler over its frames from its last chunk boundary only, reading the keys/values and
convolution histories of the frames before it from `EstimatorMemory` (modules/flow_paged.py). Streams at different
positions share one call: rows are padded to a (batch, frames, past pages) bucket, and each bucket's Euler step is
one CUDA graph replayed once per step (a step counter on the device picks the step's times and memory).

Pages are allocated as a stream's boundary advances and freed when it ends; a stream that cannot get a page (the
pool is sized from the GPU memory budget) goes back to the re-run for the rest of its life, which needs no state.
Allocation and release run on the vocoder thread; other threads only queue releases.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .cuda_graphs import capture_graph, replay, smallest_at_least
from .host_copy import to_device
from .modules.flow import FlowBatch
from .modules.flow_cfm import euler_times
from .modules.flow_paged import EstimatorMemory, PagedTables, paged_euler_step

log = logging.getLogger(__name__)

# Past lengths (pages) with graphs; a longer past runs eagerly (over 64 s of audio before the window).
PAST_PAGE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


@dataclass
class StreamPages:
    """One stream's share of the memory: a history slot per guidance branch, and its committed chunks' pages."""

    slots: tuple[int, int]
    pages: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    kept_frames: int = 0  # frames before the stream's boundary, whose memory the pages hold
    released: bool = False


@dataclass
class PagedRow:
    """One stream's part of a call: frames start..end-1 are evaluated, those before `commit` become final."""

    pages: StreamPages
    start: int
    commit: int
    end: int


class StepRunner:
    """One Euler step of a (batch, frames, past pages) bucket over static buffers: a CUDA graph once `capture`d,
    else run eagerly (the CPU, and shapes with no graph), the same code either way."""

    def __init__(self, owner: "PagedFlow", batch: int, frames: int, past_pages: int):
        self.owner = owner
        self.buffers = owner.buffers(batch, frames, past_pages)
        self.graph = None

    def capture(self, pool) -> None:
        self.graph, _ = capture_graph(self._step, self.owner.device, pool)

    def _step(self):
        b = self.buffers
        x = paged_euler_step(self.owner.cfm, b["x"], b["mu"], b["mask"], b["spks"], b["cond"], self.owner.t_all,
                             self.owner.dt_all, b["step"], self.owner.memory, b["tables"])
        b["x"].copy_(x)
        b["step"].add_(1)

    def run(self, inputs: dict) -> torch.Tensor:
        for name in ("x", "mu", "mask", "cond", "spks", "table_data"):
            self.buffers[name].copy_(inputs[name])
        return self.sample()

    def sample(self) -> torch.Tensor:
        """Every Euler step on what the buffers hold; returns the buffer holding the result."""
        self.buffers["step"].zero_()
        for _ in range(self.owner.steps):
            if self.graph is not None:
                replay(self.graph)
            else:
                self._step()
        return self.buffers["x"]


class PagedFlow:
    def __init__(self, cfm, device: torch.device, dtype: torch.dtype, batch_sizes: list[int], frame_sizes: list[int],
                 max_later_frames: int, page_frames: int, steps: int = 10, min_past_pages: int = 1):
        """cfm: the flow's `CausalConditionalCFM` (not a graphed wrapper); frame_sizes: window widths (multiples of
        the page); max_later_frames: the widest window of a stream's later chunks (first calls, with no past,
        may use every frame size); min_past_pages: the shortest past a later call can have (smaller past buckets
        are not captured). `attach` gives it its memory."""
        self.cfm = cfm
        self.memory: EstimatorMemory | None = None
        self.device = device
        self.dtype = dtype
        self.steps = steps
        self.page_frames = page_frames
        self.mel_bins = int(cfm.estimator.out_channels)
        self.batch_sizes = sorted(batch_sizes)
        self.frame_sizes = sorted(f for f in frame_sizes if f % page_frames == 0)
        self.max_later_frames = max_later_frames
        self.past_sizes = [0, min_past_pages] + [p for p in PAST_PAGE_BUCKETS if p > min_past_pages]
        self.graphs: dict[tuple[int, int, int], StepRunner] = {}
        self._pool = None
        times = euler_times(cfm.time_grid(steps, device, dtype))
        self.t_all = torch.cat([t.reshape(1) for t, _ in times])
        self.dt_all = torch.cat([dt.reshape(1) for _, dt in times])
        self._free_pages: list[int] = []
        self._free_slots: list[int] = []
        self._released: list[StreamPages] = []
        self._unclear_slots: list[int] = []  # of streams opened since the last call: zeroed together before it
        self._lock = threading.Lock()
        self.calls = {"graphed": 0, "eager": 0, "fallbacks": 0}

    def memory_for(self, estimator, pages: int, slots: int) -> EstimatorMemory:
        """A pool of `pages` pages per layer, kind and step, with the window pages this sampler's calls need."""
        return EstimatorMemory(estimator, self.steps, pages, slots, self.page_frames, self.dtype, self.device,
                               window_rows=2 * self.batch_sizes[-1],
                               window_pages=self.max_later_frames // self.page_frames)

    def attach(self, memory: EstimatorMemory) -> None:
        if memory.steps != self.steps or memory.page_frames != self.page_frames:
            raise ValueError("the memory's Euler steps and page size must be the sampler's")
        if (memory.window_rows < 2 * self.batch_sizes[-1]
                or memory.window_pages < self.max_later_frames // self.page_frames):
            raise ValueError("the memory's window pages must hold the widest call with a past")
        self.memory = memory
        self._free_pages = list(range(memory.pages - 1, 0, -1))  # page 0 is scratch
        self._free_slots = list(range(memory.slots - 1, 0, -1))  # slot 0 is scratch

    # --- memory ---------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def open_stream(self) -> StreamPages | None:
        """A new stream's slots, or None when every slot is taken."""
        self.apply_releases()
        if len(self._free_slots) < 2:
            return None
        slots = (self._free_slots.pop(), self._free_slots.pop())
        # Zeroed at the next call with every other stream opened for it: one kernel per convolution for all of
        # them (one stream at a time cost about 1.5 ms each on an H100, run s1).
        self._unclear_slots.extend(slots)
        return StreamPages(slots)

    def grow(self, pages: StreamPages, count: int) -> bool:
        """`count` more pages per branch for `pages`; False (nothing taken) when the pool has too few."""
        if 2 * count > len(self._free_pages):
            return False
        for branch in pages.pages:
            branch.extend(self._free_pages.pop() for _ in range(count))
        return True

    def release(self, pages: StreamPages) -> None:
        """Give a stream's memory back; from any thread, at most once. Applied at the next call (vocoder thread),
        so a chunk in flight still owns its pages until it is done."""
        with self._lock:
            if pages.released:
                return
            pages.released = True
            self._released.append(pages)

    def apply_releases(self) -> None:
        with self._lock:
            released, self._released = self._released, []
        for pages in released:
            for branch in pages.pages:
                self._free_pages.extend(branch)
                branch.clear()
            self._free_slots.extend(pages.slots)

    # --- shapes -------------------------------------------------------------------------------
    def bucket(self, batch: int, frames: int, past_pages: int) -> tuple[int, int, int] | None:
        rows = smallest_at_least(self.batch_sizes, batch)
        width = smallest_at_least(self.frame_sizes, frames)
        past = smallest_at_least(self.past_sizes, past_pages)
        if rows is None or width is None or past is None or (past and width > self.max_later_frames):
            return None
        return rows, width, past

    def shapes_within(self, frame_rows: int, max_past_pages: int | None = None) -> list[tuple[int, int, int]]:
        """Buckets of at most `frame_rows` padded batch x frames, and of at most 4 x `frame_rows` batch x keys (the
        past and the window: what each layer gathers), batch 1 always; windows wider than a later chunk's only
        with no past (first calls); pasts of at most `max_past_pages` (None: every past bucket)."""
        shapes = []
        for frames in self.frame_sizes:
            for batch in self.batch_sizes:
                if batch != 1 and batch * frames > frame_rows:
                    continue
                for past in self.past_sizes:
                    if max_past_pages is not None and past > max_past_pages:
                        continue
                    if past and (frames > self.max_later_frames
                                 or (batch != 1 and batch * (frames + past * self.page_frames) > 4 * frame_rows)):
                        continue
                    shapes.append((batch, frames, past))
        return shapes

    def capture(self, shapes: list[tuple[int, int, int]]) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32,
                                                    cache_enabled=False):
            for shape in sorted(shapes, key=lambda s: -s[0] * (s[1] + s[2] * self.page_frames)):
                if shape in self.graphs:
                    continue
                runner = StepRunner(self, *shape)
                try:
                    runner.capture(self._pool)
                except torch.cuda.OutOfMemoryError:  # that shape runs eagerly; smaller ones may still fit
                    log.warning("no memory to capture the incremental flow step for %s; it runs eagerly", shape)
                    continue
                self.graphs[shape] = runner

    # --- a call --------------------------------------------------------------------------------
    def buffers(self, batch: int, frames: int, past_pages: int) -> dict:
        """Inputs of a (batch, frames, past pages) call; the tables are views of one int64 tensor (one copy)."""
        device, dtype, rows = self.device, self.dtype, 2 * batch
        bins = self.mel_bins
        widths = {"read": past_pages, "write": frames // self.page_frames, "slots": 1, "advance": 1, "past": 1,
                  "length": 1}
        data = torch.zeros(rows, sum(widths.values()), dtype=torch.long, device=device)
        views, at = {}, 0
        for name, width in widths.items():
            views[name] = data[:, at:at + width]
            at += width
        tables = PagedTables(read=views["read"], write=views["write"], slots=views["slots"][:, 0],
                             advance=views["advance"][:, 0], past=views["past"][:, 0], length=views["length"][:, 0])
        return {
            "x": torch.zeros(batch, bins, frames, dtype=dtype, device=device),
            "mu": torch.zeros(batch, bins, frames, dtype=dtype, device=device),
            "mask": torch.zeros(batch, 1, frames, dtype=dtype, device=device),
            "cond": torch.zeros(batch, bins, frames, dtype=dtype, device=device),
            "spks": torch.zeros(batch, bins, dtype=dtype, device=device),
            "step": torch.zeros(1, dtype=torch.long, device=device),
            "table_data": data,
            "tables": tables,
        }

    def _table_data(self, rows: list[PagedRow], batch: int, frames: int, past_pages: int) -> np.ndarray:
        """The int64 tables of a padded call, built on the host (padding rows: scratch page and slot, length 1)."""
        page = self.page_frames
        write_pages = frames // page
        data = np.zeros((2, batch, past_pages + write_pages + 4), dtype=np.int64)
        data[:, :, -1] = 1  # length
        for b, row in enumerate(rows):
            first, last = row.start // page, row.commit // page
            for branch in range(2):
                owned = row.pages.pages[branch]
                data[branch, b, :first] = owned[:first]
                data[branch, b, past_pages:past_pages + last - first] = owned[first:last]
                data[branch, b, -4:] = (row.pages.slots[branch], row.commit - row.start, row.start,
                                        row.end - row.start)
        return data.reshape(2 * batch, -1)

    @torch.inference_mode()
    def sample(self, prepared: FlowBatch, indices: list[int], rows: list[PagedRow]) -> list[torch.Tensor]:
        """Mel of frames start..end-1 of each row ([80, end - start] in the sampler's dtype: views of a buffer that
        the next call of the same shape rewrites); `indices`: each row's place in `prepared` (the whole-prefix
        encoder output). The rows' pages for start..commit must be allocated."""
        page = self.page_frames
        count = len(rows)
        longest = max(row.end - row.start for row in rows)
        past_pages = max(row.start // page for row in rows)
        noise_frames = self.cfm.rand_noise.shape[2]
        if max(row.end for row in rows) > noise_frames:
            raise ValueError(f"the flow handles at most {noise_frames} mel frames ({noise_frames // 50} s) per request")
        shape = self.bucket(count, longest, past_pages)
        if shape is None:
            shape = (count, -(-longest // page) * page, past_pages)
        batch, frames, past = shape
        inputs = self._inputs(prepared, indices, rows, batch, frames, past)
        if self._unclear_slots:
            self.memory.clear_slots(self._unclear_slots)
            self._unclear_slots = []
        runner = self.graphs.get(shape)
        self.calls["graphed" if runner is not None else "eager"] += 1
        x = (runner or StepRunner(self, batch, frames, past)).run(inputs)
        return [x[b, :, : row.end - row.start] for b, row in enumerate(rows)]

    def _inputs(self, prepared: FlowBatch, indices: list[int], rows: list[PagedRow], batch: int, frames: int,
                past_pages: int) -> dict:
        device, count = self.device, len(rows)
        starts = np.zeros(batch, dtype=np.int64)
        lengths = np.ones(batch, dtype=np.int64)
        starts[:count] = [row.start for row in rows]
        lengths[:count] = [row.end - row.start for row in rows]
        index = np.zeros(batch, dtype=np.int64)
        index[:count] = indices
        host = np.concatenate([starts, lengths, index])
        starts_d, lengths_d, index_d = to_device(host, device).split(batch)
        offsets = torch.arange(frames, device=device)
        positions = starts_d.unsqueeze(1) + offsets  # [batch, frames] absolute frames
        valid = offsets.unsqueeze(0) < lengths_d.unsqueeze(1)
        width = prepared.mu.shape[2]
        source = positions.clamp(max=width - 1).unsqueeze(1).expand(-1, prepared.mu.shape[1], -1)
        mask = valid.unsqueeze(1).to(self.dtype)
        mu = prepared.mu.index_select(0, index_d).gather(2, source).to(self.dtype) * mask
        cond = prepared.cond.index_select(0, index_d).gather(2, source).to(self.dtype) * mask
        noise = self.cfm.rand_noise[0].index_select(1, positions.clamp(max=self.cfm.rand_noise.shape[2] - 1)
                                                    .reshape(-1))
        x = noise.view(-1, batch, frames).transpose(0, 1).to(self.dtype)
        spks = prepared.speaker.index_select(0, index_d).to(self.dtype)
        table_data = to_device(self._table_data(rows, batch, frames, past_pages), device)
        return {"x": x, "mu": mu, "mask": mask, "cond": cond, "spks": spks, "table_data": table_data}
