"""`VllmEngine`: our Engine with the speech-token LM stage on vLLM's async engine (`AsyncLLM`).

Everything but the LM is the native engine's: frontend, voices, requests, the loop thread that schedules and runs
the flow + HiFT chunks. Each request's LM programme is run by `driver.LMDriver` on an asyncio loop of its own
thread ("cosyvoice-vllm"), against `VllmClient`, which embeds the driver's context with our model's embeddings
(sos/task, Qwen2 text embedding, speech embedding) and sends it to vLLM as `prompt_embeds`, with repetition-aware
sampling done by `logits.RasLogitsProcessor`. Tokens come back to the engine thread through a locked mailbox per
segment; cancelling a request cancels its driver task, which closes vLLM's generate() stream and so aborts the
vLLM request.

`client_factory` (tests) replaces vLLM with any `driver.LMClient`; vLLM is then not imported.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from torch import nn

from ..engine.engine import DTYPES, Engine
from ..engine.errors import EngineError
from ..engine.lm_program import LMProtocolError, Piece
from ..engine.request import Request
from ..engine.sampling import SamplingError
from .driver import LMClient, LMDriver, Segment, SubRequest
from .export import ExportInfo, ensure_export

log = logging.getLogger(__name__)

VLLM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ENV_GPU_UTIL = "COSYVOICE_VLLM_GPU_MEMORY_UTILIZATION"
ENV_KV_BYTES = "COSYVOICE_VLLM_KV_CACHE_BYTES"
ENV_EXPORT_DIR = "COSYVOICE_VLLM_EXPORT_DIR"


@dataclass
class _Mailbox:
    """What a driver (asyncio thread) hands the engine thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    error: EngineError | None = None

    def take(self) -> tuple[list[int], bool, EngineError | None]:
        with self.lock:
            tokens, self.tokens = self.tokens, []
            return tokens, self.done, self.error


@dataclass
class _Run:
    """Engine-side record of one segment on the LM server."""

    segment: Segment
    stream: object  # the StreamState the tokens are for
    mailbox: _Mailbox = field(default_factory=_Mailbox)
    task: asyncio.Task | None = None


class VllmClient:
    """`driver.LMClient` over vLLM's AsyncLLM: embeds the context, maps a SubRequest to SamplingParams."""

    def __init__(self, llm, embed: Callable[[list[Piece]], torch.Tensor]):
        self.llm = llm
        self.embed = embed

    def sampling_params(self, spec: SubRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from .logits import EXTRA_KEY

        ras = spec.ras
        # temperature 1 and no top-k/top-p of vLLM's own: it draws from exactly what the RAS processor returns
        return SamplingParams(
            temperature=1.0, top_k=0, top_p=1.0, max_tokens=spec.max_tokens, stop_token_ids=list(spec.stop_token_ids),
            ignore_eos=False, seed=spec.seed, detokenize=False, output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_KEY: {"top_k": ras.top_k, "top_p": ras.top_p, "win_size": ras.win_size,
                                    "tau_r": ras.tau_r, "eos": spec.eos, "history": list(spec.history),
                                    "mask_eos_steps": spec.mask_eos_steps}})

    async def generate(self, context: list[Piece], spec: SubRequest, request_id: str) -> AsyncIterator[list[int]]:
        prompt = {"prompt_embeds": self.embed(context)}
        stream = self.llm.generate(prompt, self.sampling_params(spec), request_id)
        try:
            async for output in stream:
                completion = output.outputs[0]
                tokens = [int(t) for t in completion.token_ids]
                stop = completion.stop_reason
                if output.finished and isinstance(stop, int) and (not tokens or tokens[-1] != stop):
                    tokens.append(stop)  # a stop token the output left out
                if tokens:
                    yield tokens
        finally:
            await stream.aclose()  # AsyncLLM.generate aborts the request when closed early


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(self, model, frontend, device, dtype, max_sessions, max_context, export: ExportInfo | None,
                 dtype_name: str, vllm_options: dict | None = None, scheduler_config=None,
                 client_factory: Callable[["VllmEngine"], LMClient] | None = None, use_cuda_graphs: bool = True):
        # The LM body runs on the server: keep only the embeddings here (sos/task, text, speech), so there is no
        # second copy of the decoder layers and the native KV cache is one position long.
        body = model.llm.llm.model.model
        body.layers = nn.ModuleList()
        # CUDA graphs stay on for the flow; the native LM decode step is never run, so it is never captured.
        # No flow memory pool (every chunk re-runs its prefix): vLLM budgets the card's memory for itself at its
        # start, and a pool taken beside it is not part of that budget yet.
        super().__init__(model, frontend, device, dtype, max_sessions, max_context=1, use_cuda_graphs=use_cuda_graphs,
                         scheduler_config=scheduler_config, flow_memory_gib=0)
        self.runner.use_cuda_graphs = False
        self.max_context = max_context
        self.export = export
        self.dtype_name = dtype_name
        self.vllm_options = dict(vllm_options or {})
        self.sampling_kind = "ras"  # repetition-aware sampling (logits.RasLogitsProcessor); nothing else is offered
        self.vllm_version = "none"
        self.vllm = None
        self.client: LMClient | None = None
        self._client_factory = client_factory
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._athread: threading.Thread | None = None
        self.driver: LMDriver | None = None
        self.counters.update({"vllm_subrequests": 0, "vllm_restarts": 0, "vllm_tokens": 0})

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "fp32", max_sessions: int = 16,
             max_context: int = 4096, use_cuda_graphs: bool = True, scheduler_config=None,
             export_dir: str | Path | None = None, vllm_options: dict | None = None,
             client_factory: Callable[["VllmEngine"], LMClient] | None = None, **_ignored) -> "VllmEngine":
        """Engine.load's arguments (use_cuda_graphs: the flow's; the LM's graphs are vLLM's business), plus where
        the export goes, extra vLLM engine arguments, and (tests) a client factory that replaces vLLM."""
        from ..engine.frontend import Frontend
        from ..engine.loader import build_modules

        if client_factory is None:
            from . import require_vllm

            require_vllm()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        torch_device = torch.device(device)
        if client_factory is None and torch_device.type == "cuda" and (torch_device.index or 0) != 0:
            # vLLM's worker always takes the first visible GPU; our stages must share it.
            raise ValueError(f"--backend vllm uses the first visible GPU: run this worker with "
                             f"CUDA_VISIBLE_DEVICES={torch_device.index} and device cuda:0 (got {device})")
        started = time.monotonic()
        export = None
        if client_factory is None:
            export = ensure_export(model_dir, export_dir or os.environ.get(ENV_EXPORT_DIR) or None)
        model = build_modules(model_dir)
        frontend = Frontend(model_dir, torch_device)
        engine = cls(model, frontend, torch_device, DTYPES[dtype], max_sessions, max_context, export, dtype,
                     vllm_options, scheduler_config, client_factory, use_cuda_graphs)
        engine._start_client()
        log.info("loaded %s on %s (%s, LM on vLLM %s, sampling %s) in %.1f s", model_dir, device, dtype,
                 engine.vllm_version, engine.sampling_kind, time.monotonic() - started)
        return engine

    def embed_context(self, context: list[Piece]) -> torch.Tensor:
        """The prompt embeddings of a context, exactly as the native runner embeds its inputs (CPU, model dtype)."""
        with torch.inference_mode():
            return self.runner.embed(context).to(device="cpu", dtype=self.dtype)

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        from .logits import RasLogitsProcessor

        config = self.llm.llm.config
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
        kv_bytes = int(os.environ.get(ENV_KV_BYTES, 0)) or max(
            64 << 20, int(1.25 * kv_per_token * self.max_sessions * self.max_context))
        options = dict(
            model=str(self.export.path),
            skip_tokenizer_init=True,
            enable_prompt_embeds=True,
            dtype=VLLM_DTYPES[self.dtype_name],
            max_model_len=self.max_context,
            max_num_seqs=self.max_sessions,
            kv_cache_memory_bytes=kv_bytes,
            seed=0,
            disable_log_stats=True,
            # A class, not a name: vLLM's engine-core and worker processes unpickle it, which imports our module
            # and so registers CosyVoice2LMForCausalLM there as well (also under the `spawn` start method).
            logits_processors=[RasLogitsProcessor],
        )
        if self.device.type == "cuda":
            options["gpu_memory_utilization"] = float(os.environ.get(ENV_GPU_UTIL, "0.9"))
        else:
            options["enforce_eager"] = True
        options.update(self.vllm_options)
        return AsyncEngineArgs(**options)

    def _start_client(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._aloop = loop
        self._athread = threading.Thread(target=run, name="cosyvoice-vllm", daemon=True)
        self._athread.start()
        ready.wait()

        async def create() -> LMClient:
            if self._client_factory is not None:
                return self._client_factory(self)
            import vllm
            from vllm.v1.engine.async_llm import AsyncLLM

            self.vllm_version = getattr(vllm, "__version__", "unknown")
            self.vllm = AsyncLLM.from_engine_args(self._engine_args())
            return VllmClient(self.vllm, self.embed_context)

        try:
            self.client = asyncio.run_coroutine_threadsafe(create(), loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self.driver = LMDriver(self.client, self.ras, self.max_context, self._post, self.counters)

    def _stop_loop(self) -> None:
        loop, self._aloop = self._aloop, None
        if loop is None:
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.debug("draining the vLLM loop failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._athread is not None:
            self._athread.join(timeout=10)
        self._athread = None
        if not loop.is_running():
            loop.close()

    def shutdown(self) -> None:
        super().shutdown()
        llm, self.vllm = self.vllm, None
        if llm is not None and self._aloop is not None:
            async def stop() -> None:
                llm.shutdown()

            try:
                asyncio.run_coroutine_threadsafe(stop(), self._aloop).result(timeout=60)
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("vLLM shutdown failed", exc_info=True)
        self._stop_loop()

    def stats(self) -> dict:
        out = super().stats()
        out.pop("kv_cache_bytes", None)  # the native cache is unused; vLLM owns the LM's KV memory
        out["lm_backend_vllm"] = 1
        out["lm_sampling_ras"] = int(self.sampling_kind == "ras")
        out["info"] = {"backend": "vllm", "sampling": self.sampling_kind, "vllm_version": self.vllm_version}
        return out

    # --- engine-thread side -------------------------------------------------------------------
    def _admit(self) -> None:
        with self._lock:
            new, self._pending = self._pending, []
        for request in new:
            self._active.append(request)  # no native KV slot: vLLM owns the LM's cache
            self._start_segment(request)

    def _start_segment(self, request: Request) -> None:
        super()._start_segment(request)  # the programme and the vocoder stream state, as native
        segment = Segment(request.program, request.id)
        request.program = None  # the native scheduler must not plan LM work for this request
        run = _Run(segment, request.stream)
        segment.run = run
        request.vllm_run = run
        if self._aloop is None or self.driver is None:
            self._fail(request, EngineError("internal", "the LM server is not running"))
            return

        def launch() -> None:
            segment.inbox = asyncio.Queue()
            run.task = asyncio.ensure_future(self._drive(run))

        self._aloop.call_soon_threadsafe(launch)

    def _drain_inboxes(self) -> None:
        for request in list(self._active):
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            run: _Run | None = getattr(request, "vllm_run", None)
            if run is None:
                continue
            for kind, ids in self._text_events(request):
                self._send(run, (kind, ids if kind == "text" else None))
            tokens, done, error = run.mailbox.take()
            if error is not None:
                self._fail(request, error)
                continue
            if request.stream is run.stream:
                request.stream.tokens.extend(tokens)
                request.stats.speech_tokens += len(tokens)
                if done:
                    request.stream.lm_done = True

    def _send(self, run: _Run, item) -> None:
        def put() -> None:
            if run.segment.inbox is not None:
                run.segment.inbox.put_nowait(item)

        self._aloop.call_soon_threadsafe(put)

    def _release(self, request: Request) -> None:
        run: _Run | None = getattr(request, "vllm_run", None)
        if run is not None:
            request.vllm_run = None
            if self._aloop is not None:
                self._aloop.call_soon_threadsafe(self._cancel, run)
        super()._release(request)

    @staticmethod
    def _cancel(run: _Run) -> None:
        if run.task is not None and not run.task.done():
            run.task.cancel()  # closes the vLLM stream: AsyncLLM aborts the request

    # --- asyncio side ---------------------------------------------------------------------------------
    def _post(self, segment: Segment, tokens: list[int], done: bool, error: EngineError | None = None) -> None:
        mailbox = segment.run.mailbox
        with mailbox.lock:
            mailbox.tokens.extend(tokens)
            mailbox.done = mailbox.done or done
            if error is not None and mailbox.error is None:
                mailbox.error = error
        self._wake.set()

    async def _drive(self, run: _Run) -> None:
        segment = run.segment
        try:
            await self.driver.drive(segment)
        except asyncio.CancelledError:
            raise
        except (LMProtocolError, SamplingError) as exc:
            self._post(segment, [], False, EngineError("generation_failed", str(exc)))
        except EngineError as exc:
            self._post(segment, [], False, exc)
        except Exception as exc:  # noqa: BLE001 - an LM server failure ends this request, not the worker
            log.exception("LM request %s failed on vLLM", segment.request_id)
            self._post(segment, [], False, EngineError("internal", f"vLLM backend error: {type(exc).__name__}"))
