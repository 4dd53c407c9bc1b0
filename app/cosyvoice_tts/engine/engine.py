"""The engine: loads a model directory, runs one loop thread that steps every active request together.

Public API (used by the worker): `Engine.load`, `start`, `warmup`, `voices`, `register_voice`, `submit`,
`stats`, `shutdown`. Everything that touches the model runs on the loop thread; callers only exchange
messages with their requests, so a slow client never stalls the GPU and no request sees another's state.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CapacityError, EngineError, InvalidRequestError, UnknownVoiceError
from .kv_cache import CacheFullError, MemoryBudgetError, ensure_kv_fits, kv_cache_bytes
from .lm_program import BistreamProgram, LMProtocolError, WholeTextProgram, pieces_length
from .loader import build_modules
from .flow_graphs import GraphedCFM, GraphedEncoder, frame_buckets
from .flow_pages import PagedFlow
from .frontend import TOKENIZER_SUBDIR
from .host_spans import span
from .hift_graphs import GraphedHiFT
from .model_runner import DecodeRow, ModelRunner, batch_ladder
from .modules import pointwise
from .modules.flow_paged import EstimatorMemory
from .request import Request, SynthesisParams
from .sampling import RasConfig, SamplingError, TokenRng, make_generator
from .scheduler import Scheduler, SchedulerConfig, audio_ahead_s, can_wait, pick_vocoder_batch
from .sm_partition import SmPartition, split_streams
from .text_worker import TextNormalizer
from .token2wav import PAGED_FROM_FRAMES, StreamConfig, StreamState, Token2Wav
from .vocoder_worker import check_mode as check_vocoder_mode, make_vocoder, on_stream
from .voices import voice_prompt

log = logging.getLogger(__name__)

# GPU memory kept for the incremental flow's own graphs and for serving when its pool is sized from the memory
# fraction (after every other graph is captured)
FLOW_RESERVE_BYTES = 8 * 2**30
URGENT_AHEAD_S = 1.0  # a playing stream with less audio than this buffered keeps its LM steps, whatever else runs
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_VOCODER_MODE = "overlap"  # docs/performance.md, run t1: at 32 streams p95 447 against 579 ms


class Engine:
    def __init__(self, model, frontend, device: torch.device, dtype: torch.dtype, max_sessions: int,
                 max_context: int, use_cuda_graphs: bool = True, scheduler_config: SchedulerConfig | None = None,
                 max_graph_frames: int = 1000, gpu_memory_fraction: float | None = None,
                 compile_kernels: bool = True, flow_memory_gib: float | None = None,
                 paged_from_frames: int = PAGED_FROM_FRAMES, lm_sms: int | None = None,
                 paged_graph_past_pages: int | None = None, vocoder_mode: str = DEFAULT_VOCODER_MODE,
                 text_worker: bool | None = None):
        check_vocoder_mode(vocoder_mode)
        # Request texts normalised in a worker process (text_worker.py), from `start`; None: on a GPU only
        self.text_worker = device.type == "cuda" if text_worker is None else bool(text_worker)
        self.text_normalizer: TextNormalizer | None = None
        self.model_dir = model.model_dir
        self.device = device
        self.dtype = dtype
        self.max_sessions = max_sessions
        self.gpu_memory_fraction = gpu_memory_fraction
        if gpu_memory_fraction is not None and device.type == "cuda":
            # Everything this process allocates on the card (weights, KV cache, graphs, activations) stays within
            # the fraction: an allocation past it fails here instead of starving a neighbour on the same GPU.
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(float(gpu_memory_fraction), index)
        self.frontend = frontend
        self.sample_rate = int(model.hparams.get("sample_rate", 24000))
        self.llm = model.llm.to(device=device, dtype=dtype)
        # The flow runs in half precision only where the reference allows it (its fp16 switch); HiFT stays fp32.
        flow_dtype = torch.float16 if dtype != torch.float32 and device.type == "cuda" else torch.float32
        self.flow = model.flow.to(device)
        if flow_dtype != torch.float32:
            self.flow.store_weights_in(flow_dtype)
        self.flow.decoder.estimator.fuse_projections()
        self.llm.llm.model.model.fuse_projections()
        # Fused elementwise kernels (torch.compile, GPU only: it needs Triton); checked, eager where unavailable.
        self.compiled_kernels = compile_kernels and device.type == "cuda" and pointwise.use_compiled(device)
        if not self.compiled_kernels:
            pointwise.use_eager()  # the choice is process-wide: an earlier engine here may have compiled them
        self.hift = model.hift.to(device)
        ras = model.llm.sampling
        self.ras = ras if isinstance(ras, RasConfig) else RasConfig()
        self.stream_config = StreamConfig(pre_lookahead_len=int(getattr(model.flow, "pre_lookahead_len", 3)),
                                          token_mel_ratio=int(getattr(model.flow, "token_mel_ratio", 2)))
        if gpu_memory_fraction is not None and device.type == "cuda":
            config = self.llm.llm.config
            budget = int(gpu_memory_fraction * torch.cuda.get_device_properties(device).total_memory)
            needed = kv_cache_bytes(config.num_hidden_layers, max_sessions, max_context, config.num_key_value_heads,
                                    config.head_dim, dtype)
            ensure_kv_fits(needed, torch.cuda.memory_allocated(device), budget, max_sessions, max_context,
                           gpu_memory_fraction)
        self.runner = ModelRunner(self.llm, device, dtype, max_sessions, max_context, use_cuda_graphs)
        self.flow_graphs = None
        self.encoder_graphs = None
        if use_cuda_graphs and device.type == "cuda":
            chunk = int(getattr(self.flow.decoder.estimator, "static_chunk_size", 0) or 50)
            self.flow_graphs = GraphedCFM(self.flow.decoder, int(self.flow.output_size), batch_ladder(max_sessions),
                                          chunk, max_frames=max_graph_frames, dtype=flow_dtype)
            self.flow.decoder = self.flow_graphs
            ratio = self.stream_config.token_mel_ratio
            self.encoder_graphs = GraphedEncoder(self.flow.encoder, batch_ladder(max_sessions),
                                                 [f // ratio for f in self.flow_graphs.frame_sizes], flow_dtype,
                                                 input_dtype=self.flow.input_embedding.weight.dtype)
            self.flow.encoder = self.encoder_graphs
        self.flow_memory_gib = flow_memory_gib  # the pool is sized at start, after the graphs
        # Incremental flow calls with a longer past run eagerly: fewer graphs to capture at start (each ~0.6 s).
        self.paged_graph_past_pages = paged_graph_past_pages
        self.paged_flow = self._paged_flow(flow_dtype, max_graph_frames, paged_from_frames)
        self.token2wav = Token2Wav(self.flow, self.hift, device, self.stream_config, flow_dtype, self.paged_flow,
                                   paged_from_frames)
        self.scheduler = Scheduler(scheduler_config)
        self.hift_graphs = None
        if use_cuda_graphs and device.type == "cuda":
            self.hift_graphs = GraphedHiFT(self.hift, batch_ladder(max_sessions), self.stream_config.source_cache_len,
                                           self.scheduler.config.max_vocoder_frames)
            self.token2wav.hift = self.hift_graphs
        self.registered: dict[str, dict] = {}
        self._pending: list[Request] = []
        self._active: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.vocoder = None  # vocoder_worker.py, made at start in `_make_vocoder`
        self._vocoder_mode = vocoder_mode
        self._first_chunk_in_flight = False
        # A step's prefill is queued with its decode and read back with it, instead of being waited for before the
        # decode is launched: the loop's host work of the step (the vocoder hand-off) then overlaps both.
        self.prefill_with_decode = True
        self.lm_sms = lm_sms  # split at start (sm_partition.py); None or 0: both on the whole GPU
        self.partition: SmPartition | None = None
        self._stopping = False
        self.counters = {"steps": 0, "decode_rows": 0, "chunks": 0, "extend_s": 0.0, "decode_s": 0.0,
                         "decode_forward_s": 0.0, "sample_s": 0.0, "sample_cpu_s": 0.0, "loop_s": 0.0,
                         "vocoder_batches": 0, "vocoder_items": 0, "prefills_with_decode": 0}

    def _paged_flow(self, flow_dtype: torch.dtype, max_graph_frames: int, paged_from_frames: int) -> PagedFlow | None:
        """The batched incremental flow sampler (its memory comes at start, see `_attach_flow_memory`); None where
        the flow cannot run incrementally or no memory is given to it: every chunk then re-runs its prefix."""
        if not self.flow.supports_incremental() or self.flow_memory_gib == 0:
            return None
        page = self.stream_config.token_mel_ratio * self.flow.incremental_unit
        frame_sizes = self.flow_graphs.frame_sizes if self.flow_graphs is not None else \
            frame_buckets(page, max_graph_frames)
        cfg = self.stream_config
        later = cfg.token_mel_ratio * (cfg.token_max_hop_len + cfg.pre_lookahead_len + self.flow.incremental_unit)
        cfm = self.flow_graphs.inner if self.flow_graphs is not None else self.flow.decoder
        # A stream's first paged call comes once its prefix passes paged_from_frames, so its later calls have
        # at least the pages before that boundary (less the partial chunk left open).
        min_past = max(1, paged_from_frames // page - 1)
        return PagedFlow(cfm, self.device, flow_dtype, batch_ladder(self.max_sessions), frame_sizes,
                         max_later_frames=-(-later // page) * page, page_frames=page, min_past_pages=min_past)

    def _attach_flow_memory(self) -> None:
        """Allocate the incremental flow's pool, once every other CUDA graph is captured: `flow_memory_gib` if
        given; on a GPU with a memory fraction, what the fraction leaves less a reserve for the flow's own graphs
        and serving; without one, 4 GiB; on the CPU, 4 pages per stream within 1 GiB. Never more than every
        session's longest graphed stream needs. Too little memory: the incremental flow is off (every chunk re-runs
        its prefix)."""
        paged = self.paged_flow
        estimator = self.flow.decoder.estimator
        page_bytes = EstimatorMemory.page_bytes(estimator, paged.steps, paged.page_frames, paged.dtype)
        cap = 2 * self.max_sessions * max(1, paged.frame_sizes[-1] // paged.page_frames) + 1
        if self.flow_memory_gib is not None:
            pages = int(self.flow_memory_gib * 2**30) // page_bytes
        elif self.device.type != "cuda":  # tests and demos: room for a few seconds per stream, within 1 GiB
            pages = min(2 * self.max_sessions * 4 + 1, 2**30 // page_bytes)
        elif self.gpu_memory_fraction is None:
            pages = 4 * 2**30 // page_bytes
        else:
            total = torch.cuda.get_device_properties(self.device).total_memory
            # Reserved, not allocated: the CUDA graphs' private pools only count in the former.
            spare = self.gpu_memory_fraction * total - torch.cuda.memory_reserved(self.device) - FLOW_RESERVE_BYTES
            pages = int(max(0, spare) // page_bytes)
        pages = min(pages, cap)
        memory = None
        while memory is None and pages >= 3:
            try:
                memory = paged.memory_for(estimator, pages, 2 * self.max_sessions + 1)
            except torch.cuda.OutOfMemoryError:  # an estimate off by what the allocator holds back: ask for less
                pages //= 2
        if memory is None:
            log.warning("no memory left for the incremental flow: every chunk re-runs its prefix")
            self.paged_flow = self.token2wav.paged = None
            return
        paged.attach(memory)
        log.info("incremental flow memory: %d pages of %d frames, %.2f GiB (%.0f s of audio over all streams)",
                 pages - 1, paged.page_frames, pages * page_bytes / 2**30, (pages - 1) / 2 * paged.page_frames / 50)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "fp32", max_sessions: int = 16,
             max_context: int = 4096, use_cuda_graphs: bool = True,
             scheduler_config: SchedulerConfig | None = None, backend: str = "native",
             gpu_memory_fraction: float | None = 0.9, compile_kernels: bool = True,
             flow_memory_gib: float | None = None, paged_from_frames: int = PAGED_FROM_FRAMES,
             lm_sms: int | None = None, paged_graph_past_pages: int | None = None,
             vocoder_mode: str = DEFAULT_VOCODER_MODE, text_worker: bool | None = None) -> "Engine":
        """gpu_memory_fraction: the share of the card this worker may allocate (native backend; vLLM sizes its
        own memory); None: no cap. compile_kernels: fused elementwise kernels on a GPU (modules/pointwise.py).
        flow_memory_gib: the incremental flow's memory pool (0: every chunk re-runs its prefix); None: sized from
        the memory fraction (see `_attach_flow_memory`). paged_from_frames: how long (mel frames, prompt included)
        a stream's prefix gets before the flow keeps its memory instead of re-running it (0: from its first chunk).
        paged_graph_past_pages: the longest past (50-frame pages) whose incremental flow calls get CUDA graphs at
        start (None: all, up to 64). lm_sms: SMs kept for the LM alone, the vocoder getting the rest
        (sm_partition.py); None or 0: both share the whole GPU. vocoder_mode: where the vocoder's host work runs,
        "thread" or "overlap" (vocoder_worker.py). text_worker: request texts are normalised in a worker process
        (text_worker.py) instead of the submitting thread; None: on a GPU only."""
        from .frontend import Frontend

        if backend == "vllm" and cls is Engine:
            from ..vllm_backend import VllmEngine

            return VllmEngine.load(model_dir, device=device, dtype=dtype, max_sessions=max_sessions,
                                   max_context=max_context, use_cuda_graphs=use_cuda_graphs,
                                   scheduler_config=scheduler_config)
        if backend not in ("native", "vllm"):
            raise ValueError(f"unknown backend {backend!r} (native or vllm)")
        if gpu_memory_fraction is not None and not 0 < gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        torch_device = torch.device(device)
        started = time.monotonic()
        model = build_modules(model_dir)
        frontend = Frontend(model_dir, torch_device)
        engine = cls(model, frontend, torch_device, DTYPES[dtype], max_sessions, max_context, use_cuda_graphs,
                     scheduler_config, gpu_memory_fraction=gpu_memory_fraction, compile_kernels=compile_kernels,
                     flow_memory_gib=flow_memory_gib, paged_from_frames=paged_from_frames, lm_sms=lm_sms,
                     paged_graph_past_pages=paged_graph_past_pages, vocoder_mode=vocoder_mode,
                     text_worker=text_worker)
        log.info("loaded %s on %s (%s) in %.1f s", model_dir, device, dtype, time.monotonic() - started)
        return engine

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.lm_sms and self.device.type == "cuda":
            self.partition = split_streams(self.device, self.lm_sms)
        try:
            self._capture_graphs()
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or a capture that failed for lack of memory
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc).lower():
                raise
            raise MemoryBudgetError(
                f"out of GPU memory while capturing CUDA graphs for {self.max_sessions} sessions (memory fraction "
                f"{self.gpu_memory_fraction}): lower --max-sessions or --max-context, or raise "
                f"--gpu-memory-fraction") from exc
        self.vocoder = self._make_vocoder(self._vocoder_mode)
        if self.text_worker:
            self.text_normalizer = TextNormalizer(Path(self.model_dir) / TOKENIZER_SUBDIR,
                                                  lambda text: self.frontend.text_normalize(text, split=True))
            self.text_normalizer.warm()
        self._thread = threading.Thread(target=self._loop, name="cosyvoice-engine", daemon=True)
        self._thread.start()

    def _make_vocoder(self, mode: str):
        return make_vocoder(mode, self.token2wav, self.device, self._wake.set,
                            self.partition.vocoder if self.partition else None)

    @property
    def vocoder_mode(self) -> str:
        return self._vocoder_mode

    def set_vocoder_mode(self, mode: str) -> None:
        """Switch the vocoder's placement (vocoder_worker.py) while no request is active (the bench's
        side-by-side levels)."""
        check_vocoder_mode(mode)
        if mode == self._vocoder_mode:
            return
        if self.active_count() or (self.vocoder is not None and not self.vocoder.idle):
            raise EngineError("busy", "the vocoder placement can only change while the engine is idle")
        old = self.vocoder
        if old is not None:
            # The loop only reads this attribute; both workers are idle with nothing to collect, so either is
            # right for an iteration in progress.
            self.vocoder = self._make_vocoder(mode)
            old.stop()
        self._vocoder_mode = mode

    def _capture_graphs(self) -> None:
        # Each stage's graphs are captured on the stream it will run on: with an SM partition, that is what
        # binds a graph to its SMs.
        with on_stream(self.partition.lm if self.partition else None):
            self.runner.capture(self.max_sessions)
        with on_stream(self.partition.vocoder if self.partition else None):
            self._capture_vocoder_graphs()

    def _capture_vocoder_graphs(self) -> None:
        if self.flow_graphs is not None:
            # Every shape a vocoder batch can take (see pick_vocoder_batch), so none is captured while serving.
            started = time.monotonic()
            shapes = self.flow_graphs.shapes_within(self.scheduler.config.max_vocoder_frames)
            for batch, frames in shapes:
                self.flow_graphs.capture(batch, frames)
            log.info("captured %d flow sampler CUDA graphs in %.1f s", len(shapes), time.monotonic() - started)
            ratio = self.stream_config.token_mel_ratio
            self.encoder_graphs.capture_all([(b, f // ratio) for b, f in shapes], int(self.flow.input_size))
        if self.hift_graphs is not None:
            self.hift_graphs.capture_all()
        if self.paged_flow is not None:
            self._attach_flow_memory()
        if self.paged_flow is not None and self.flow_graphs is not None:
            started = time.monotonic()
            shapes = self.paged_flow.shapes_within(self.scheduler.config.max_vocoder_frames,
                                                   self.paged_graph_past_pages)
            self.paged_flow.capture(shapes)
            log.info("captured %d incremental flow step CUDA graphs in %.1f s", len(shapes),
                     time.monotonic() - started)

    def warmup(self) -> dict:
        voice = self.voices()[0]
        request = self.submit(SynthesisParams(voice=voice, seed=0), text="Hello, warm up.")
        request.audio()
        return request.summary

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.vocoder is not None:
            self.vocoder.stop()
        if self.text_normalizer is not None:
            self.text_normalizer.close()
            self.text_normalizer = None

    # --- voices ---------------------------------------------------------------------------
    def voices(self) -> list[str]:
        return list(self.frontend.spk2info) + list(self.registered)

    def register_voice(self, voice_id: str, wav: np.ndarray, sample_rate: int, prompt_text: str) -> None:
        if not voice_id or not isinstance(voice_id, str):
            raise InvalidRequestError("voice_id must be a non-empty string")
        if voice_id in self.frontend.spk2info:
            raise InvalidRequestError(f"voice id {voice_id!r} is a built-in speaker")
        if not prompt_text or not prompt_text.strip():
            raise InvalidRequestError("prompt_text must not be empty")
        try:
            features = self.frontend.make_voice(np.asarray(wav, dtype=np.float32), int(sample_rate), prompt_text)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        self.registered[voice_id] = features

    def _voice(self, name: str) -> dict:
        if name in self.registered:
            return self.registered[name]
        if name in self.frontend.spk2info:
            return self.frontend.spk2info[name]
        raise UnknownVoiceError(name, self.voices())

    # --- requests ---------------------------------------------------------------------------
    def submit(self, params: SynthesisParams, text: str | None = None) -> Request:
        """Validate and queue a request. text=None: bistream (push_text / end_text)."""
        if self._stopping:
            raise EngineError("draining", "the engine is shutting down")
        if not 0.5 <= float(params.speed) <= 2.0:
            raise InvalidRequestError("speed must be between 0.5 and 2.0")
        voice = self._voice(params.voice)
        prompt = voice_prompt(params.mode, voice, self._tokenize, params.instruct_text)
        request = Request(params, self.sample_rate, self._wake)
        request.voice_prompt = prompt
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # Separate streams for token sampling and vocoder noise: how the scheduler interleaves the two stages
        # must not change what either draws. The vocoder's noise (24000 x 9 normals per second of audio) is
        # drawn where the vocoder runs: on the CPU it cost more than the whole HiFT network on the GPU.
        request.generator = TokenRng(seed)
        request.vocoder_generator = make_generator(seed + 1, self.device)
        if text is None:
            request.bistream = True
        else:
            if not text.strip():
                raise InvalidRequestError("text is empty")
            request.stats.chars = len(text)
            request.stats.text_ended_at = request.stats.submitted_at
            request._text_closed = True
            normalizer = self.text_normalizer
            pieces = normalizer.normalize(text) if normalizer else self.frontend.text_normalize(text, split=True)
            segments = [s for s in pieces if s.strip()]
            if not segments:
                raise InvalidRequestError("text has nothing to speak after normalisation")
            request.segments.extend(segments)
        with self._lock:
            if len(self._pending) + len(self._active) >= self.max_sessions:
                raise CapacityError(self.max_sessions)
            self._pending.append(request)
        self._wake.set()
        return request

    def active_count(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._active)

    def stats(self) -> dict:
        out = {"active_requests": self.active_count(), "max_sessions": self.max_sessions,
               "kv_cache_bytes": self.runner.cache.bytes, **self.counters,
               "info": {"backend": "native", "sampling": "ras"}}
        out["vocoder_s"] = self.vocoder.busy_s if self.vocoder else 0.0
        launcher = getattr(self.vocoder, "launcher", None)  # overlap: the thread launching the sampler's replays
        out["vocoder_host_replay_s"] = launcher.busy_s if launcher is not None else 0.0
        for stage, seconds in self.token2wav.host_s.items():  # host time launching vocoder batches
            out[f"vocoder_host_{stage}_s"] = seconds
        if self.flow_graphs is not None:
            out["flow_graphed_calls"] = self.flow_graphs.calls["graphed"]
            out["flow_eager_calls"] = self.flow_graphs.calls["eager"]
        if self.paged_flow is not None:
            out["flow_paged_graphed_calls"] = self.paged_flow.calls["graphed"]
            out["flow_paged_eager_calls"] = self.paged_flow.calls["eager"]
            out["flow_paged_fallbacks"] = self.paged_flow.calls["fallbacks"]
            out["flow_memory_pages_free"] = self.paged_flow.free_pages
            out["flow_memory_pages"] = self.paged_flow.memory.pages - 1
        if self.encoder_graphs is not None:
            out["encoder_graphed_calls"] = self.encoder_graphs.calls["graphed"]
            out["encoder_eager_calls"] = self.encoder_graphs.calls["eager"]
        if self.hift_graphs is not None:
            out["hift_graphed_calls"] = self.hift_graphs.calls["graphed"]
            out["hift_eager_calls"] = self.hift_graphs.calls["eager"]
        if self.device.type == "cuda":
            out["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            out["gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def _tokenize(self, text: str) -> list[int]:
        return list(self.frontend.tokenize(text))

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        # Two Python threads share the GIL (LM loop, vocoder). Every torch call releases it, and taking it back
        # from a thread running Python waits up to the switch interval: with the default 5 ms (or even 0.5 ms),
        # the LM loop's few dozen calls a step could wait longer than the step's GPU work.
        sys.setswitchinterval(0.0001)
        if self.device.type != "cuda":
            self._serve()
            return
        # LM steps are short and every stream waits on them; the vocoder's batches are long. On a stream of
        # higher priority the GPU schedules LM kernels first whenever both have work queued; on an SM partition,
        # LM kernels never wait for the vocoder's running blocks.
        lm_stream = self.partition.lm if self.partition else torch.cuda.Stream(self.device, priority=-1)
        lm_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(lm_stream):
            self._serve()

    def _serve(self) -> None:
        while not self._stopping:
            started = time.perf_counter()
            self._wake.clear()
            with span("loop.bookkeeping"):
                self._collect_vocoded()
                self._admit()
                self._drain_inboxes()
                plan = self.scheduler.plan(self._active)
            vocode = bool(plan.chunks) and self.vocoder.idle
            stage_due = self.vocoder.stage_due  # overlap: a batch's flow is done, its HiFT waits to be launched
            if self._first_chunk_in_flight and not vocode:
                self._yield_to_first_chunk(plan)
            lm_work = bool(plan.extend or plan.decode)
            if not lm_work and not vocode and not stage_due:
                if not self._active and not self._pending and self.vocoder.idle and self.flow_graphs is not None \
                        and self.flow_graphs.missing:
                    try:
                        # idle: nothing else is on the GPU. Captured on the stream that will replay it when
                        # that decides its SMs; else from the default stream, as at start.
                        home = self.partition.vocoder if self.partition else torch.cuda.default_stream(self.device)
                        with torch.cuda.stream(home):
                            self.flow_graphs.capture_missing(limit=1)
                    except RuntimeError:  # e.g. the memory cap: those shapes stay eager, the loop lives on
                        log.exception("capturing a flow graph failed; its shapes run eagerly")
                        self.flow_graphs.missing.clear()
                        self.flow_graphs.capture_disabled = True
                    continue
                self._wake.wait()
                continue
            # Host time between LM steps: collecting audio, admission, text, planning (and handing chunks to the
            # vocoder, counted where it runs).
            self.counters["loop_s"] += time.perf_counter() - started
            hand_off = (lambda: self._hand_to_vocoder(plan.chunks)) if vocode else \
                self.vocoder.advance if stage_due else None
            if not lm_work:
                self._timed_hand_off(hand_off)
                continue
            try:
                self._run(plan, hand_off)
            except Exception:  # a bug must not take the worker down: fail what was in the step, go on
                log.exception("engine step failed")
                for request in plan.extend + plan.decode:
                    self._fail(request, EngineError("internal", "internal engine error"))
        for request in self._pending + self._active:
            self._fail(request, EngineError("draining", "the engine shut down"))

    def _admit(self) -> None:
        # Pending to active in one step under the lock: a request in between would be counted by neither, and
        # `submit` would let one more in than there are KV slots.
        with self._lock:
            new, self._pending = self._pending, []
            self._active.extend(new)
        for request in new:
            try:
                request.slot = self.runner.cache.allocate()
            except CacheFullError:
                self._fail(request, CapacityError(self.max_sessions))
                continue
            request.stats.admitted_step = self.counters["steps"]
            self._start_segment(request)

    def _start_segment(self, request: Request) -> None:
        prompt = request.voice_prompt
        request.position = 0
        if request.bistream:
            request.program = BistreamProgram(prompt.prompt_text, prompt.llm_prompt_speech,
                                              self.llm.speech_token_size, self.ras, request.generator,
                                              mix_ratio=self.llm.mix_ratio)
        else:
            text_ids = self._tokenize(request.segments.popleft())
            request.stats.text_tokens += len(text_ids)
            request.program = WholeTextProgram(text_ids, prompt.prompt_text, prompt.llm_prompt_speech,
                                               self.llm.speech_token_size, self.ras, request.generator)
        request.stream = StreamState(prompt.flow_prompt_speech, prompt.prompt_feat, prompt.embedding,
                                     stream=request.params.stream, speed=float(request.params.speed),
                                     cfg=self.stream_config)

    def _text_events(self, request: Request) -> list[tuple[str, list[int]]]:
        """The request's streamed text since the last step, tokenised: ("text", ids) and ("end", [])."""
        events = []
        for kind, value in request.take_inbox():
            if not request.bistream:
                continue  # whole-text requests were given all their text at submission
            if kind == "text":
                ids = self._tokenize(value)
                request.stats.text_tokens += len(ids)
                if ids:
                    events.append(("text", ids))
            elif kind == "end":
                events.append(("end", []))
        return events

    def _drain_inboxes(self) -> None:
        for request in list(self._active):
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                for kind, ids in self._text_events(request):
                    if kind == "text":
                        request.program.push_text(ids)
                    else:
                        request.program.end_text()
                if request.program.done:
                    request.stream.lm_done = True
            except (LMProtocolError, SamplingError) as exc:
                self._fail(request, EngineError("generation_failed", str(exc)))

    def _run(self, plan, hand_off=None) -> None:
        """One LM step. `hand_off` (chunks to the vocoder) runs while the GPU decodes; first if nothing decodes."""
        self.counters["steps"] += 1
        if not plan.decode:
            self._timed_hand_off(hand_off)
        t0 = time.perf_counter()
        prefill = None
        if plan.extend:
            with span("lm.extend"):
                prefill = self._launch_extend(plan.extend)
                if prefill is not None and not (self.prefill_with_decode and plan.decode):
                    self._take_extend(*prefill)
                    prefill = None
        t1 = time.perf_counter()
        handed = 0.0
        if plan.decode:
            handed = self._lm_decode([r for r in plan.decode if r in self._active], hand_off)
        t2 = time.perf_counter()
        if prefill is not None:
            with span("lm.extend"):
                self._take_extend(*prefill)  # read back with the decode step: no wait left
            self.counters["prefills_with_decode"] += 1
        # Each phase ends in a device-to-host copy, so wall time per phase is the device time too; a prefill read
        # back with the decode step counts its device time in the decode's.
        self.counters["extend_s"] += t1 - t0 + time.perf_counter() - t2
        self.counters["decode_s"] += t2 - t1 - handed

    def _timed_hand_off(self, hand_off) -> float:
        """Run `hand_off` (if any), counting its time as the loop's host time; returns that time."""
        if hand_off is None:
            return 0.0
        started = time.perf_counter()
        with span("vocoder.hand_off"):
            hand_off()
        spent = time.perf_counter() - started
        self.counters["loop_s"] += spent
        return spent

    def _launch_extend(self, requests: list[Request]):
        """Queue the prefill (or several inputs) of every request of the step, in one forward where one fits;
        None if none fits its context, else what `_take_extend` needs."""
        fits, items = [], []
        for request in requests:
            pieces = request.program.take_input()
            try:
                self.runner.check_context(request.position, pieces_length(pieces))
            except CacheFullError as exc:
                self._fail(request, EngineError("context_full", str(exc)))
                continue
            fits.append(request)
            items.append((request.slot, request.position, pieces))
        if not items:
            return None
        return fits, [pieces_length(pieces) for _, _, pieces in items], self.runner.launch_extend_batch(items)

    def _take_extend(self, requests: list[Request], lengths: list[int], pending) -> None:
        for request, length, logp in zip(requests, lengths, pending.result()):
            if request not in self._active:
                continue  # failed in between
            request.position += length
            self._after_lm(request, logp)

    def _lm_decode(self, requests: list[Request], hand_off=None) -> float:
        """One decode step for `requests`; `hand_off` runs once the step is launched, before its result is read
        back, so that its host work overlaps the step's GPU time. Returns the time `hand_off` took."""
        rows = []
        for request in requests:
            (_, (token,)), = request.program.take_input()
            rows.append(DecodeRow(request.slot, request.position, token))
        t0 = time.perf_counter()
        try:
            with span("lm.launch"):
                launched = self.runner.launch_decode(rows) if rows else None
        except CacheFullError:
            for request in requests:
                if request.position + 1 > self.runner.max_len:
                    self._fail(request, EngineError("context_full", "the request's context is full"))
            return self._timed_hand_off(hand_off)
        handed = self._timed_hand_off(hand_off)
        if launched is None:
            return handed
        with span("lm.readback"):
            logps = self.runner.decode_result(launched)
        t1 = time.perf_counter()
        cpu1 = time.thread_time()
        self.counters["decode_rows"] += len(rows)
        with span("lm.sample"):
            for request, logp in zip(requests, logps):
                request.position += 1
                self._after_lm(request, logp)
        # The forward (ending in its device-to-host copy) and the per-request sampling on the CPU, apart; the
        # sampling also in this thread's CPU time, which leaves out the time it waited for the GIL.
        self.counters["decode_forward_s"] += t1 - t0 - handed
        self.counters["sample_s"] += time.perf_counter() - t1
        self.counters["sample_cpu_s"] += time.thread_time() - cpu1
        return handed

    def _after_lm(self, request: Request, logp: torch.Tensor) -> None:
        try:
            step = request.program.on_logprobs(logp)
        except (LMProtocolError, SamplingError) as exc:
            self._fail(request, EngineError("generation_failed", str(exc)))
            return
        request.stream.tokens.extend(step.tokens)
        request.stats.speech_tokens += len(step.tokens)
        if step.done:
            request.stream.lm_done = True
        if request.stats.first_tokens_at is None and request.stream.has_chunk():
            request.stats.first_tokens_at = time.monotonic()
            request.stats.first_tokens_step = self.counters["steps"]

    def _yield_to_first_chunk(self, plan) -> None:
        """While a first chunk is being vocoded, step only the streams that need it now.

        The vocoder thread shares the GIL with this loop; at low load, stepping everyone's LM meanwhile slows
        the first chunk (measured 244 ms inline vs 432 ms overlapped, one stream, H200) for no gain, since
        the other streams are ahead of real time anyway. Streams close to stalling keep stepping, and so do
        requests still decoding their own first chunk's tokens (held back, they would wait behind every
        other first chunk: under load one is nearly always in flight)."""
        now = time.monotonic()

        def urgent(request: Request) -> bool:
            stats = request.stats
            if stats.first_vocode_at is None:
                return True  # still producing the tokens of its own first chunk
            return stats.first_chunk_at is not None and audio_ahead_s(request, now) < URGENT_AHEAD_S

        plan.decode = [r for r in plan.decode if urgent(r)]
        plan.extend = [r for r in plan.extend if urgent(r)]

    def _hand_to_vocoder(self, ready: list[Request]) -> None:
        chunks = [request.stream.next_chunk() for request in ready]
        ready = [r for r, c in zip(ready, chunks) if c is not None]
        chunks = [c for c in chunks if c is not None]
        if not ready:
            return
        by_request = dict(zip(map(id, ready), chunks))
        frames = [r.stream.flow_frames(c) for r, c in zip(ready, chunks)]
        shape = self.flow_graphs.padded_shape if self.flow_graphs is not None else (lambda n, f: (n, f))
        now = time.monotonic()
        config = self.scheduler.config
        may_wait = lambda r: can_wait(r, now)  # noqa: E731
        chosen = pick_vocoder_batch(ready, frames, config.max_vocoder_frames, shape,
                                    may_wait if config.fit_batches else None,
                                    may_wait if config.first_chunks_apart else None)
        batch = []
        for request in chosen:
            request.vocoding = True
            if request.stats.first_vocode_at is None:
                request.stats.first_vocode_at = now
            batch.append((request, request.stream, by_request[id(request)], request.vocoder_generator))
        self._first_chunk_in_flight = any(r.stats.first_chunk_at is None for r in chosen)
        self.counters["vocoder_batches"] += 1
        self.counters["vocoder_items"] += len(batch)
        self.vocoder.submit(batch)

    def _collect_vocoded(self) -> None:
        now = time.monotonic()
        results = self.vocoder.take_results() if self.vocoder else []
        if results:
            self._first_chunk_in_flight = False
        for request, state, audio, error in results:
            request.vocoding = False
            if request not in self._active or request.stream is not state:
                continue  # cancelled or failed while its chunk was being vocoded
            if error is not None:
                self._fail(request, EngineError("internal", "internal vocoder error"))
                continue
            self.counters["chunks"] += 1
            if audio.size:
                if request.stats.first_chunk_at is None:
                    request.stats.first_chunk_at = now
                request.stats.audio_samples += int(audio.size)
                request.outbox.put(("audio", audio.astype(np.float32, copy=False)))
            if state.final_emitted:
                if request.segments:
                    self._start_segment(request)
                else:
                    self._finish(request, "ok")

    # --- endings ------------------------------------------------------------------------------
    def _release(self, request: Request) -> None:
        if request in self._active:
            self._active.remove(request)
        if request.slot is not None:
            self.runner.cache.release(request.slot)
            request.slot = None
        request.program = None
        if request.stream is not None:
            self.token2wav.forget(request.stream)
        request.stream = None

    def _finish(self, request: Request, outcome: str) -> None:
        self._release(request)
        request.stats.outcome = outcome
        request.stats.finished_at = time.monotonic()
        request.outbox.put(("end", outcome))

    def _fail(self, request: Request, error: EngineError) -> None:
        with self._lock:
            if request in self._pending:
                self._pending.remove(request)
        self._release(request)
        request.stats.outcome = "error"
        request.stats.finished_at = time.monotonic()
        request.error = error
        request.outbox.put(("error", error))
