"""Speech tokens -> audio chunks for one request: chunk schedule, flow + HiFT calls, caches and cross-fade.

Every request owns a `StreamState` (hop length, offset, HiFT caches): nothing is shared between requests, so
one request's growing hop can never leak into another's (the reference keeps it on the shared model object).
"""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .cuda_graphs import deferred_replays
from .flow_pages import PagedFlow, PagedRow, StreamPages
from .host_copy import to_device, to_host
from .host_spans import span
from .modules.flow import FlowBatch, HostLengths


@dataclass(frozen=True)
class StreamConfig:
    token_hop_len: int = 25  # must match the flow's training static chunk (25 tokens = 50 mel frames)
    token_max_hop_len: int = 100
    stream_scale_factor: float = 2.0
    pre_lookahead_len: int = 3
    token_mel_ratio: int = 2
    mel_cache_len: int = 8  # mel frames HiFT re-synthesises at each join
    samples_per_frame: int = 480

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.samples_per_frame


@dataclass
class Chunk:
    """One flow + HiFT job: the tokens to run (the whole prefix, as the flow needs) and where new audio starts."""

    tokens: list[int]
    token_offset: int
    finalize: bool


FULL_RERUN = "full-rerun"
# A stream re-runs its flow prefix until it is longer than this (mel frames, prompt included), then keeps the
# estimator's memory (flow_pages.py). 0: from its first chunk, unless that chunk is vocoded alone. On an H100
# (docs/performance.md, runs s1-s3) 32 first chunks cost 97 ms paged against 84 re-run, and 32 last chunks of a
# 93-token stream 117 against 195: at 32 streams the engine gave 6-7% more audio per second and a lower p95.
PAGED_FROM_FRAMES = 0


@dataclass
class StreamState:
    prompt_token: torch.Tensor  # [1, P] int32
    prompt_feat: torch.Tensor  # [1, T, 80]
    embedding: torch.Tensor  # [1, 192]
    stream: bool
    speed: float
    cfg: StreamConfig
    tokens: list[int] = field(default_factory=list)
    token_offset: int = 0
    hop: int = 0
    lm_done: bool = False
    final_emitted: bool = False
    hift_mel: torch.Tensor | None = None
    hift_source: torch.Tensor | None = None
    hift_speech: torch.Tensor | None = None
    chunks_done: int = 0
    # The flow's memory of this stream between chunks (flow_pages.StreamPages), FULL_RERUN once it re-runs its
    # whole prefix at every chunk instead, None before its first chunk. Written by the vocoder thread only.
    flow_memory: object | None = None
    ended: bool = False  # the request is gone (set by any thread): its memory goes back, none is taken for it

    def __post_init__(self) -> None:
        prompt_len = int(self.prompt_token.shape[1])
        hop = self.cfg.token_hop_len
        # The first hop is padded so that prompt + first chunk fill whole flow chunks.
        pad = int(np.ceil(prompt_len / hop) * hop - prompt_len)
        self.hop = hop + pad

    def next_chunk(self) -> Chunk | None:
        if self.final_emitted:
            return None
        if self.stream:
            needed = self.hop + self.cfg.pre_lookahead_len
            if len(self.tokens) - self.token_offset >= needed:
                return Chunk(self.tokens[: self.token_offset + needed], self.token_offset, finalize=False)
        if self.lm_done:
            return Chunk(list(self.tokens), self.token_offset, finalize=True)
        return None

    def has_chunk(self) -> bool:
        """Whether `next_chunk` would return one (without building it)."""
        if self.final_emitted:
            return False
        ready = len(self.tokens) - self.token_offset >= self.hop + self.cfg.pre_lookahead_len
        return (self.stream and ready) or self.lm_done

    def flow_frames(self, chunk: Chunk) -> int:
        """Mel frames the flow computes for this chunk: prompt and tokens so far, all upsampled, less the frames
        whose work the stream's flow memory keeps."""
        frames = self.cfg.token_mel_ratio * (int(self.prompt_token.shape[1]) + len(chunk.tokens))
        kept = getattr(self.flow_memory, "kept_frames", 0)
        return max(1, frames - kept)

    def advance(self, chunk: Chunk) -> None:
        self.chunks_done += 1
        if chunk.finalize:
            self.final_emitted = True
            return
        self.token_offset += self.hop
        hop = self.cfg.token_hop_len if self.chunks_done == 1 else self.hop
        # Later hops grow (fewer, larger flow calls) once the stream is safely ahead of playback.
        self.hop = int(min(self.cfg.token_max_hop_len, hop * self.cfg.stream_scale_factor))


def hamming_window(length: int) -> torch.Tensor:
    n = torch.arange(length, dtype=torch.float64)
    return (0.54 - 0.46 * torch.cos(2 * torch.pi * n / (length - 1))).float()


class Token2Wav:
    """Runs chunks through the flow and HiFT stages on the engine's device."""

    def __init__(self, flow: torch.nn.Module, hift: torch.nn.Module, device: torch.device, cfg: StreamConfig,
                 flow_dtype: torch.dtype = torch.float32, paged: PagedFlow | None = None,
                 paged_from_frames: int = PAGED_FROM_FRAMES):
        """paged: the batched incremental sampler (a streaming request's chunks then cost what is new, not the
        whole prefix); None: every chunk re-runs its prefix, as upstream does. paged_from_frames: a stream keeps
        re-running until its prefix (prompt included) is longer than this many mel frames."""
        self.flow = flow
        self.hift = hift
        self.device = device
        self.cfg = cfg
        self.flow_dtype = flow_dtype
        self.paged = paged
        self.paged_from_frames = paged_from_frames
        self.window = hamming_window(2 * cfg.source_cache_len)
        self._windows: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # Host time spent launching batches, by stage (the engine's counters): inputs and encoder, sampler, HiFT
        self.host_s = {"prepare": 0.0, "sample": 0.0, "hift": 0.0}

    def forget(self, state: StreamState) -> None:
        """The request of `state` ended (any thread): its flow memory goes back to the pool."""
        state.ended = True
        memory = state.flow_memory
        if self.paged is not None and isinstance(memory, StreamPages):
            self.paged.release(memory)  # the vocoder thread releases it too if it took memory meanwhile

    def run_batch(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]]) -> list[np.ndarray]:
        """Flow and HiFT for several requests' chunks in one call each; returns each request's new audio."""
        return self.launch_batch(items).result()

    def launch_batch(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]]) -> "VocodedBatch":
        """`run_batch` without waiting for the device: every kernel of the batch is queued on the current stream
        and the audio is on its way to the host when this returns. The states have advanced already; the next
        batch of the same streams may be launched once this one's `result()` is in (the vocoder's graphs share
        their input buffers)."""
        return self.launch_flow(items).launch_vocoder()

    @torch.inference_mode()
    def launch_flow(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]],
                    launcher=None) -> "FlowLaunched":
        """The flow half of `launch_batch`: encoder and sampler queued on the current stream. Its
        `launch_vocoder()` queues HiFT, best once `ready()`: queued behind a sampler still running, the host
        work of HiFT's inputs and joins can wait for the device (seen on an H200 at 32 streams: the loop that
        launched a whole batch at once spent 33 ms doing it). launcher: a `vocoder_worker.ReplayLauncher` that
        launches the sampler's graph replays (and marks the flow's end) from its own thread."""
        with span("vocoder.flow"):
            return self._launch_flow(items, launcher)

    def _launch_flow(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]],
                     launcher=None) -> "FlowLaunched":
        started = time.perf_counter()
        device = self.device
        states = [state for state, _, _ in items]
        chunks = [chunk for _, chunk, _ in items]
        # Inputs gathered on the host and copied over once each: this thread shares the GIL with the LM loop,
        # and every torch call it makes per request is a chance to keep the loop waiting.
        tokens = _pad_int([c.tokens for c in chunks], device)
        prompt_tokens = _pad_int([s.prompt_token[0].tolist() for s in states], device)
        feat_len = max(s.prompt_feat.shape[1] for s in states)
        prompt_feat = torch.zeros(len(items), feat_len, 80, device=device)
        for i, s in enumerate(states):
            if s.prompt_feat.shape[1]:
                prompt_feat[i, : s.prompt_feat.shape[1]] = to_device(s.prompt_feat[0], device)
        host_lengths = HostLengths([len(c.tokens) for c in chunks], [int(s.prompt_token.shape[1]) for s in states],
                                   [int(s.prompt_feat.shape[1]) for s in states])
        lengths = to_device([host_lengths.token, host_lengths.prompt_token, host_lengths.prompt_feat], device,
                            torch.long)
        with torch.autocast(device.type, dtype=self.flow_dtype, enabled=self.flow_dtype != torch.float32,
                            cache_enabled=False):
            prepared = self.flow.prepare_batch(
                token=tokens,
                token_len=lengths[0],
                prompt_token=prompt_tokens,
                prompt_token_len=lengths[1],
                prompt_feat=prompt_feat,
                prompt_feat_len=lengths[2],
                embedding=to_device(torch.cat([s.embedding for s in states]), device),
                streaming=[s.stream for s in states],
                finalize=[c.finalize for c in chunks],
                host_lengths=host_lengths,
            )
            sampled = time.perf_counter()
            with span("vocoder.sample"), (deferred_replays() if launcher is not None else nullcontext([])) as replays:
                mels = self._sample(prepared, states, chunks)
        self.host_s["prepare"] += sampled - started
        self.host_s["sample"] += time.perf_counter() - sampled
        for state in states:
            if state.ended:  # ended while this batch ran, perhaps after its memory was taken: give it back
                self.forget(state)
        launched = FlowLaunched(self, items, mels, record=not replays)
        if replays:
            launcher.submit(replays, launched)
        return launched

    def _new_mels(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]], mels: list) -> list:
        """Each chunk's new mel, float32 [1, 80, T]: from the first frame after the prompt and the audio already
        sent. Taken once the sampler is done (its replays may be launched after `launch_flow` returns)."""
        new_mels = []
        for (state, chunk, _), (mel, first) in zip(items, mels):
            begin = int(state.prompt_feat.shape[1]) + chunk.token_offset * self.cfg.token_mel_ratio - first
            mel = mel.float()[None, :, begin:]
            if chunk.finalize and state.speed != 1.0 and state.hift_mel is None:
                mel = F.interpolate(mel, size=int(mel.shape[2] / state.speed), mode="linear")
            new_mels.append(mel)
        return new_mels

    @torch.inference_mode()
    def _launch_vocoder(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]],
                        mels: list[torch.Tensor]) -> "VocodedBatch":
        with span("vocoder.hift"):
            return self._launch_hift(items, mels)

    def _launch_hift(self, items: list[tuple[StreamState, Chunk, torch.Generator | None]],
                     mels: list[torch.Tensor]) -> "VocodedBatch":
        started = time.perf_counter()
        states = [state for state, _, _ in items]
        chunks = [chunk for _, chunk, _ in items]
        mels = self._new_mels(items, mels)
        speech = self._vocode_batch(states, mels, [c.finalize for c in chunks], [g for _, _, g in items])
        for state, chunk in zip(states, chunks):
            state.advance(chunk)
        # One device-to-host copy for the batch, not waited for here.
        vocoded = VocodedBatch(torch.cat([s.reshape(-1) for s in speech]), [int(s.shape[-1]) for s in speech])
        self.host_s["hift"] += time.perf_counter() - started
        return vocoded

    def _encoded_tokens(self, state: StreamState, chunk: Chunk) -> int:
        """Prompt and speech tokens whose frames this chunk's flow call produces (the lookahead excluded)."""
        lookahead = 0 if chunk.finalize else self.cfg.pre_lookahead_len
        return int(state.prompt_token.shape[1]) + len(chunk.tokens) - lookahead

    def _sample(self, prepared: FlowBatch, states: list[StreamState], chunks: list[Chunk]):
        """The sampler for every chunk: paged rows in one call, the rest re-run their prefix in another.
        Returns (mel [80, T] in the sampler's dtype, absolute index of its first frame) per chunk: views of the
        sampler's output buffers, valid until the next batch."""
        ratio = self.cfg.token_mel_ratio
        if self.paged is not None:
            self.paged.apply_releases()  # of streams that ended since the last batch
        alone = len(states) == 1
        rows = [self._paged_row(state, chunk, alone) for state, chunk in zip(states, chunks)]
        out: list = [None] * len(states)
        paged = [i for i, row in enumerate(rows) if row is not None]
        if paged:
            mels = self.paged.sample(prepared, paged, [rows[i] for i in paged])
            for i, mel in zip(paged, mels):
                row = rows[i]
                out[i] = (mel, row.start)
                row.pages.kept_frames = row.commit
                if chunks[i].finalize:
                    self.paged.release(row.pages)
        full = [i for i, row in enumerate(rows) if row is None]
        if full:
            ends = [ratio * self._encoded_tokens(states[i], chunks[i]) for i in full]
            sub = prepared
            if len(full) != len(states):
                index = to_device(full, prepared.mu.device, torch.long)
                width = max(ends)
                sub = FlowBatch(*(t.index_select(0, index) for t in (
                    prepared.mu[:, :, :width], prepared.mask[:, :, :width], prepared.cond[:, :, :width],
                    prepared.speaker, prepared.mel_len, prepared.prompt_feat_len, prepared.streaming)))
            mel, _ = self.flow.decoder(mu=sub.mu, mask=sub.mask, spks=sub.speaker, cond=sub.cond, n_timesteps=10,
                                       streaming=sub.streaming)
            for j, (i, end) in enumerate(zip(full, ends)):
                first = int(states[i].prompt_feat.shape[1])
                out[i] = (mel[j, :, first:end], first)
        return out

    def _paged_row(self, state: StreamState, chunk: Chunk, alone: bool) -> PagedRow | None:
        """This chunk's part of the paged call, its pages allocated; None: it re-runs its prefix. alone: the
        chunk is its batch's only one."""
        if self.paged is None or not state.stream or state.flow_memory == FULL_RERUN or state.ended:
            return None
        memory = state.flow_memory
        ratio, unit = self.cfg.token_mel_ratio, self.flow.incremental_unit
        encoded = self._encoded_tokens(state, chunk)
        # Re-run while the prefix is short (paged_from_frames, 0: never), and a first chunk vocoded alone (an idle
        # GPU, and a listener waiting). The first paged call starts the memory from frame 0 and costs more than
        # the re-run of the same frames (H100, run s1: a first chunk's sampler 31 ms paged against 24 re-run);
        # every later call costs less (32 last chunks of 93 tokens: 80 against 163 ms).
        if memory is None and (ratio * encoded <= self.paged_from_frames or (alone and state.chunks_done == 0)):
            return None
        if memory is None:
            memory = state.flow_memory = self.paged.open_stream()
            if memory is None:
                return self._rerun_from_now_on(state)
        if memory.released:  # its request ended while the chunk waited: the re-run computes it, for nobody
            state.flow_memory = FULL_RERUN
            return None
        start, end = memory.kept_frames, ratio * encoded
        commit = max(start, ratio * (encoded // unit * unit))
        widest = self.paged.max_later_frames if start else self.paged.frame_sizes[-1]
        if end - start > widest or not self.paged.grow(memory, (commit - start) // (ratio * unit)):
            return self._rerun_from_now_on(state)
        return PagedRow(memory, start, commit, end)

    def _rerun_from_now_on(self, state: StreamState) -> None:
        """The pool is full (or the window too wide): the stream re-runs its prefix from now on, which needs no
        memory, so it gives its pages back."""
        if isinstance(state.flow_memory, StreamPages):
            self.paged.release(state.flow_memory)
        state.flow_memory = FULL_RERUN
        self.paged.calls["fallbacks"] += 1
        return None

    def _vocode_batch(self, states, mels, finalizes, generators) -> list[torch.Tensor]:
        inputs, caches = [], []
        for state, mel in zip(states, mels):
            if state.hift_mel is not None:
                inputs.append(torch.cat([state.hift_mel, mel], dim=2))
                caches.append(state.hift_source)
            else:
                inputs.append(mel)
                caches.append(None)
        outputs = self.hift.inference_batch(inputs, caches, generators)
        return [self._join(state, mel, speech, source, finalize)
                for state, mel, (speech, source), finalize in zip(states, inputs, outputs, finalizes)]

    def _join(self, state: StreamState, mel: torch.Tensor, speech: torch.Tensor, source: torch.Tensor,
              finalize: bool) -> torch.Tensor:
        cfg = self.cfg
        if state.hift_speech is not None:
            speech = self._cross_fade(speech, state.hift_speech)
        if finalize:
            return speech
        # Copies, not views: the mel can be a CUDA graph's output, rewritten by the next replay (another request's).
        state.hift_mel = mel[:, :, -cfg.mel_cache_len:].clone()
        state.hift_source = source[:, :, -cfg.source_cache_len:].clone()
        state.hift_speech = speech[:, -cfg.source_cache_len:].clone()
        # The tail is held back: the next chunk re-synthesises it and fades across.
        return speech[:, : -cfg.source_cache_len]

    def _cross_fade(self, speech: torch.Tensor, previous_tail: torch.Tensor) -> torch.Tensor:
        overlap = self.window.shape[0] // 2
        key = (speech.device, speech.dtype)
        if key not in self._windows:  # copied once: a host-to-device copy per join would wait for the stream
            self._windows[key] = self.window.to(*key)
        window = self._windows[key]
        speech = speech.clone()
        speech[:, :overlap] = speech[:, :overlap] * window[:overlap] + previous_tail[:, -overlap:] * window[overlap:]
        return speech


class _Launched:
    """Work queued on a stream, with an event marking its end on a GPU (none on the CPU, where it is done when
    queued). record=False: the work is not all queued yet; whichever thread queues its last kernel calls
    `record()` (or `fail()`), and until then the work is not ready."""

    def __init__(self, device: torch.device, record: bool = True):
        self.device = device
        self.event = None
        self.error: Exception | None = None
        self._recorded = threading.Event()
        if record:
            self.record()

    def record(self) -> None:
        """Mark the end of the work queued so far on this thread's current stream."""
        if self.device.type == "cuda":
            # blocking: a thread waiting for it sleeps instead of spinning a core
            self.event = torch.cuda.Event(blocking=True)
            self.event.record()
        self._recorded.set()

    def fail(self, error: Exception) -> None:
        """Queuing the rest failed: the work is over, with `error`."""
        self.error = error
        self._recorded.set()

    def ready(self) -> bool:
        if not self._recorded.is_set():
            return False
        return self.error is not None or self.event is None or self.event.query()

    def wait(self) -> None:
        self._recorded.wait()
        if self.event is not None and self.error is None:
            self.event.synchronize()


class FlowLaunched(_Launched):
    """A batch whose flow is queued (`Token2Wav.launch_flow`); `launch_vocoder` queues the rest."""

    def __init__(self, token2wav: Token2Wav, items: list, mels: list, record: bool = True):
        super().__init__(token2wav.device, record)
        self.token2wav, self.items, self.mels = token2wav, items, mels

    def launch_vocoder(self) -> "VocodedBatch":
        if self.error is not None:
            raise self.error
        return self.token2wav._launch_vocoder(self.items, self.mels)


class VocodedBatch(_Launched):
    """A launched batch's audio on its way to the host: on a GPU, a copy into pinned memory that an event marks
    done, so the thread that launched the batch goes on (LM steps) while the vocoder's kernels run."""

    def __init__(self, flat: torch.Tensor, lengths: list[int]):
        self.lengths = lengths
        self._host = to_host(flat)
        super().__init__(flat.device)

    def result(self) -> list[np.ndarray]:
        """Each item's new audio (float32), waiting for the device if it is not done yet."""
        self.wait()
        return np.split(self._host.numpy(), np.cumsum(self.lengths)[:-1])


def _pad_int(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return to_device(out, device)
